"""Generation presets plus explicit overrides -> kwargs for `model.generate`."""

from __future__ import annotations

PRESETS = {
    "deterministic": {"do_sample": False},
    "creative": {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "top_k": 50},
}


def generation_kwargs(gen_cfg) -> dict:
    kw = dict(PRESETS[gen_cfg.preset])
    kw["max_new_tokens"] = gen_cfg.max_new_tokens
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(gen_cfg, name)
        if value is not None:
            kw[name] = value
            kw["do_sample"] = True  # an explicit sampling knob means sampling
    if gen_cfg.temperature == 0:
        kw = {k: v for k, v in kw.items() if k not in ("temperature", "top_p", "top_k")} | {"do_sample": False}
    if gen_cfg.repetition_penalty is not None:
        kw["repetition_penalty"] = gen_cfg.repetition_penalty
    return kw


def default_sampling(gen_cfg) -> tuple[float, float]:
    """(temperature, top_p) of a generation config, for runtimes that take the two numbers rather than
    `generate` kwargs (the server's rows, llama.cpp, onnxruntime-genai, an Ollama Modelfile): set values win,
    else the preset's; 0 means greedy."""
    preset = PRESETS[gen_cfg.preset]
    temperature = gen_cfg.temperature if gen_cfg.temperature is not None else preset.get("temperature", 0.0)
    top_p = gen_cfg.top_p if gen_cfg.top_p is not None else preset.get("top_p", 1.0)
    return float(temperature), float(top_p)
