"""`ayar export RUN --to gguf --kind lora [--quant q8_0|f16]`: the base model as a GGUF and the run's adapter as a
GGUF LoRA beside it, not merged, so one base serves many adapters (`ayar serve --backend gguf --adapter ...`, or
Ollama's `ADAPTER`). The adapter is converted by llama.cpp's own `convert_lora_to_gguf.py`; the release gate loads
the pair in llama.cpp and compares it with the run's PEFT model like any export.

The LoRA converter is not on PyPI on its own: it is taken from the llama.cpp sources inside the llama-cpp-python
sdist of the installed version (its license beside it) and put next to the HF converter, whose `conversion`
package it imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ayar.errors import AyarError
from ayar.fsutil import atomic_directory, claim_output, shareable

BASES = ("q8_0", "f16")  # what the base may be: the converter writes both (a LoRA on a 4-bit base drifts further)
KINDS = tuple(f"lora-{q}" for q in BASES)
ADAPTER_FILE = "adapter-f16.gguf"


def ensure_lora_converter(log=print) -> Path:
    """convert_lora_to_gguf.py beside the HF converter, taken from the llama-cpp-python sdist once."""
    import importlib.metadata

    from ayar.exports.gguf import ensure_converter

    folder = ensure_converter(log).parent
    script = folder / "convert_lora_to_gguf.py"
    if script.is_file():
        return script
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise AyarError("the GGUF LoRA export needs llama.cpp's Python bindings: pip install 'ayar[gguf]'") from None
    log(f"taking llama.cpp's convert_lora_to_gguf.py from the llama-cpp-python {version} sources (once)")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp]
        proc = subprocess.run([*cmd, f"llama-cpp-python=={version}"], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise AyarError(
                f"could not download the llama-cpp-python {version} sources for the LoRA converter ({last})"
            )
        with tarfile.open(sdists[0]) as tar:
            for name, target in (("convert_lora_to_gguf.py", script), ("LICENSE", folder / "LICENSE-llama.cpp")):
                member = tar.getmember(f"{sdists[0].name[: -len('.tar.gz')]}/vendor/llama.cpp/{name}")
                data = tar.extractfile(member).read()
                partial = target.with_suffix(".partial")
                partial.write_bytes(data)
                os.replace(partial, target)
    return script


def base_gguf_name(quant: str) -> str:
    return f"model-{quant}.gguf"


def export_gguf_lora(run_dir: str | Path, out: str | Path, kind: str = "lora-q8_0", log=print, force=False) -> Path:
    """Write OUT/model-QUANT.gguf (the base), OUT/adapter-f16.gguf (the LoRA), OUT/Modelfile and OUT/lora.json
    (what the adapter applies to); returns OUT."""
    from ayar.exports.gguf import convert, ensure_converter, modelfile
    from ayar.exports.merged import chat_template_for, load_run, write_legacy_rope

    if kind not in KINDS:
        raise AyarError(f"--quant {kind.removeprefix('lora-')!r} for a GGUF LoRA export: choose {' or '.join(BASES)}")
    quant = kind.removeprefix("lora-")
    out = Path(out)
    claim_output(out, force)
    engine, run = load_run(run_dir, log=lambda *_: None)
    if not hasattr(engine.model, "unload"):
        raise AyarError(
            f"{run_dir} is a full fine-tune: it has no adapter to export apart (use --to gguf without --kind)"
        )
    adapter_config = json.loads((run.adapter / "adapter_config.json").read_text())
    if adapter_config.get("use_dora"):
        raise AyarError(
            f"{run_dir} trained a DoRA adapter: llama.cpp's LoRA has no magnitude vectors; export it merged "
            "(ayar export RUN --to gguf)"
        )
    script, lora_script = ensure_converter(log), ensure_lora_converter(log)
    recipe = modelfile(engine, base_gguf_name(quant)).replace("\n\n", f"\nADAPTER ./{ADAPTER_FILE}\n\n", 1)
    tok = engine.tok
    tok.chat_template = chat_template_for(engine)  # the base GGUF carries the run's chat format
    base_model = engine.model.unload()  # the adapter's layers taken out, not merged in
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tmp-gguf-lora-") as tmp:
        base = Path(tmp) / "base"
        base_model.save_pretrained(base, safe_serialization=True)
        tok.save_pretrained(base)
        write_legacy_rope(base / "config.json")
        log(f"converting the base to GGUF ({quant}) with llama.cpp's convert_hf_to_gguf.py")
        converted = Path(tmp) / base_gguf_name(quant)
        convert(script, [str(base), "--outfile", str(converted), "--outtype", quant], converted)
        log("converting the adapter to a GGUF LoRA with llama.cpp's convert_lora_to_gguf.py")
        lora = Path(tmp) / ADAPTER_FILE
        convert(lora_script, [str(run.adapter), "--base", str(base), "--outfile", str(lora), "--outtype", "f16"], lora)
        with atomic_directory(out, mark=f"ayar export --to gguf --kind lora --quant {quant} of {run_dir}") as final:
            os.replace(converted, final / converted.name)
            os.replace(lora, final / lora.name)
            (final / "Modelfile").write_text(recipe)
            (final / "lora.json").write_text(json.dumps({"applies_to": run.adapter_base(), "base": quant}, indent=1))
    shareable(out)
    log(f"wrote {out}: the base {base_gguf_name(quant)} and the LoRA {ADAPTER_FILE} (ollama create NAME -f Modelfile)")
    return out


def lora_file(path: str | Path) -> Path:
    """The GGUF LoRA to serve for `path`: a .gguf file, a GGUF LoRA export folder, or a run directory with a GGUF
    LoRA export that passed its release gate (RUN/export/gguf-lora-*)."""
    from ayar.infer.gguf_engine import gguf_adapter

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if gguf_adapter(path):
        return gguf_adapter(path)
    if (path / "run.json").is_file():
        for kind in KINDS:
            folder = path / "export" / f"gguf-{kind}"
            try:
                passed = json.loads((folder / "gate.json").read_text())["ok"]
            except (OSError, ValueError, KeyError):
                continue
            if passed and gguf_adapter(folder):
                return gguf_adapter(folder)
        raise AyarError(
            f"{path} has no GGUF LoRA export that passed its release gate: run `ayar export {path} --to gguf --kind "
            "lora` first (or serve it with --backend transformers)"
        )
    raise AyarError(f"{path} is not a GGUF LoRA (.gguf), a GGUF LoRA export folder or an ayar run directory")
