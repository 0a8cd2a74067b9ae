"""`ayar export RUN --to onnx`: the merged model built for ONNX Runtime GenAI (KV cache, fp32 / int8 / int4
weights) by onnxruntime-genai's own model builder, and loaded back with onnxruntime-genai for the gate.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ayar.errors import AyarError
from ayar.fsutil import atomic_directory, claim_output, shareable
from ayar.infer.onnx_engine import require_onnx

PRECISIONS = ("fp32", "int8", "int4")


def export_onnx(run_dir: str | Path, out: str | Path, precision: str = "int8", log=print, force: bool = False) -> Path:
    from ayar.exports.merged import export_merged

    if precision not in PRECISIONS:
        raise AyarError(f"--quant {precision!r} for ONNX: choose one of {', '.join(PRECISIONS)}")
    require_onnx()
    out = Path(out)
    claim_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tmp-onnx-") as tmp:
        merged = export_merged(run_dir, Path(tmp) / "merged", "fp32", log=log)
        log(f"building the ONNX model ({precision}) with onnxruntime-genai's model builder")
        built = Path(tmp) / "onnx"
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(merged),
            "-o",
            str(built),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            str(Path(tmp) / "cache"),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not (built / "genai_config.json").is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise AyarError(f"onnxruntime-genai's builder failed on {merged} (exit {proc.returncode}):\n{tail}")
        (built / "README.md").write_text(_card(run_dir, precision))
        with atomic_directory(out, mark=f"ayar export --to onnx --quant {precision} of {run_dir}") as final:
            for f in built.iterdir():
                os.replace(f, final / f.name)
    shareable(out)
    log(f"wrote {out}")
    return out


def _card(run_dir, precision: str) -> str:
    return (
        f"# {Path(run_dir).name} (ONNX, {precision})\n\nBuilt by ayar with onnxruntime-genai's model builder from the "
        "merged model. Run it with onnxruntime-genai (`og.Model(PATH)`), or `ayar chat PATH`.\n"
    )
