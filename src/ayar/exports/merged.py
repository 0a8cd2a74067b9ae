"""`ayar export RUN --to merged`: the adapter merged into the base, saved as safetensors with the
tokenizer, a chat template that renders exactly what training rendered, and a generation config that
stops at the end-of-turn token."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ayar.errors import AyarError
from ayar.fsutil import atomic_directory, claim_output, shareable

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The run's `alpaca` template as a chat template (what ayar.data.render renders for a single-turn prompt).
ALPACA_CHAT_TEMPLATE = (
    "{% set system = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | list %}"
    "{% set users = messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | list %}"
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{{ (system + users[:1]) | join('\n\n') }}"
    "\n\n### Response:\n{% for m in messages if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endfor %}"
)


def load_run(run_dir: str | Path, log=print):
    """(engine, run config) for a run directory: the PEFT model the gate compares exports against."""
    from ayar.infer.load import load_engine
    from ayar.rundir import RunDir

    run = RunDir.open(run_dir)
    if not run.adapter.is_dir() and not run.full_model.is_dir():
        raise AyarError(f"{run_dir} has no adapter/ or model/ (the run has not finished): export a finished run")
    return load_engine(run.path, log=log, dtype="float32"), run  # merge in fp32, then cast


def chat_template_for(engine) -> str:
    """A chat template whose rendering equals the run's renderer: the run's system prompt becomes the
    default system message; the alpaca template becomes a jinja template."""
    r = engine.renderer
    template = engine.tok.chat_template
    if r.template == "alpaca":
        probe = engine.tok("x")["input_ids"]  # training encoded with special tokens: a BOS if this tokenizer adds one
        adds_bos = engine.tok.bos_token_id is not None and probe[:1] == [engine.tok.bos_token_id]
        template = ("{{ bos_token }}" if adds_bos else "") + ALPACA_CHAT_TEMPLATE
    if not template:
        raise AyarError("the run's tokenizer has no chat template to export")
    if r.system_prompt:
        default = json.dumps(r.system_prompt)
        template = (
            f"{{% if not messages or messages[0]['role'] != 'system' %}}"
            f"{{% set messages = [{{'role': 'system', 'content': {default}}}] + messages %}}{{% endif %}}" + template
        )
    return template


def export_merged(
    run_dir: str | Path, out: str | Path, dtype: str = "fp32", log=print, engine=None, force: bool = False
) -> Path:
    """`engine`: the run already loaded in fp32 (`load_run`); its model is merged in place, so it is used up.
    `out` must be new or empty, or (with `force`) an earlier export of ayar's (fsutil.claim_output)."""
    from ayar.rundir import RunDir

    if dtype not in DTYPES:
        raise AyarError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out)
    claim_output(out, force)
    engine, run = (engine, RunDir.open(run_dir)) if engine is not None else load_run(run_dir, log=log)
    if hasattr(engine.model, "merge_and_unload"):
        log(f"merging {run.adapter} into the base ({dtype})")
        model = engine.model.merge_and_unload().to(DTYPES[dtype])
    else:  # a full fine-tune: the weights are the model
        log(f"writing {run.full_model} ({dtype})")
        model = engine.model.to(DTYPES[dtype])
    tok = engine.tok
    tok.chat_template = chat_template_for(engine)
    gen = model.generation_config
    gen.eos_token_id = sorted(engine.stop_ids)  # the end-of-turn token stops generation, not only EOS
    gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen.do_sample = False
    for name in ("temperature", "top_p", "top_k"):
        setattr(gen, name, None)
    with atomic_directory(out, mark=f"ayar export --to merged --dtype {dtype} of {run.path}") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_legacy_rope(Path(tmp) / "config.json")
        (Path(tmp) / "README.md").write_text(_model_card(run, dtype))
    shareable(out)
    log(f"wrote {out}")
    return out


def write_legacy_rope(config_path: Path) -> None:
    """transformers 5 writes `rope_parameters`; readers built on transformers 4.x look for `rope_theta`
    and silently fall back to 10000 without it. Write both."""
    cfg = json.loads(config_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        config_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _model_card(run, dtype: str) -> str:
    meta = run.read_meta()
    return (
        f"# {run.path.name} (merged)\n\nFine-tuned with ayar from `{meta.get('base_model')}`; the LoRA adapter is "
        f"merged into the weights ({dtype}, safetensors).\n\nThe tokenizer's chat template renders prompts exactly "
        "as training did, and `generation_config.json` stops at the end-of-turn token.\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(PATH)\nmodel = AutoModelForCausalLM.from_pretrained(PATH)\n```\n"
    )
