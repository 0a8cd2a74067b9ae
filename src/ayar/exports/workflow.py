"""Export a run and put the export through the release gate: the one function the CLI (`ayar export`), the
Python API and the web UI call. Formats are a registry: each names its default precision, how it is
written, and the runtime that loads it back for the gate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ayar.exports.gate import GateReport


@dataclass(frozen=True)
class Format:
    default_kind: str  # dtype or quantization when none is given
    kinds: tuple[str, ...]  # what the format's writer accepts (listed by front ends; the writer checks)
    write: Callable  # (run_dir, out, kind, log, force) -> the artifact's path (a folder, or the GGUF file)
    load: Callable  # (artifact path) -> an engine of the export's own runtime


def _merged(run_dir, out, kind, log, force=False):
    from ayar.exports.merged import export_merged

    return export_merged(run_dir, out, kind, log=log, force=force)


def _onnx(run_dir, out, kind, log, force=False):
    from ayar.exports.onnx import export_onnx

    return export_onnx(run_dir, out, kind, log=log, force=force)


def _gguf(run_dir, out, kind, log, force=False):
    from ayar.exports.gguf import export_gguf
    from ayar.exports.gguf_lora import export_gguf_lora

    if kind.startswith("lora-"):  # the base and the adapter as two GGUFs, not merged
        return export_gguf_lora(run_dir, out, kind, log=log, force=force)
    return export_gguf(run_dir, out, kind, log=log, force=force)


def _vllm(run_dir, out, kind, log, force=False):
    from ayar.exports.vllm import export_vllm

    return export_vllm(run_dir, out, kind, log=log, force=force)


def _load_vllm(path):
    from ayar.exports.vllm import VllmArtifact

    return VllmArtifact(path)


def _load_merged(path):
    from ayar.exports.gate import MergedArtifact

    return MergedArtifact(path)


def _load_onnx(path):
    from ayar.infer.onnx_engine import OnnxEngine

    return OnnxEngine(path)


def _load_gguf(path):
    from ayar.infer.gguf_engine import GgufEngine

    return GgufEngine(path)


FORMATS = {
    "merged": Format("fp32", ("fp32", "bf16", "fp16"), _merged, _load_merged),
    "onnx": Format("int8", ("fp32", "int8", "int4"), _onnx, _load_onnx),
    "gguf": Format("q8_0", ("f16", "q8_0", "q4_k_m", "q4_0", "lora-q8_0", "lora-f16"), _gguf, _load_gguf),
    # for a GPU box: the adapter (or the merged model) with a launch script and Kubernetes manifests
    "vllm": Format("lora", ("lora", "merged"), _vllm, _load_vllm),
}


@dataclass
class Export:
    """A written export: the folder, the artifact in it (the folder, or the GGUF file), its precision, and
    the gate's report (None when not verified)."""

    folder: Path
    artifact: Path
    to: str
    kind: str
    gate: GateReport | None = None

    @property
    def ok(self) -> bool:
        return self.gate is None or self.gate.ok


def export_run(
    run_dir: str | Path,
    to: str = "merged",
    kind: str | None = None,
    out: str | Path | None = None,
    verify: bool = True,
    max_new_tokens: int = 48,
    log=print,
    force: bool = False,
) -> Export:
    """Write RUN as `to` (merged, onnx, gguf, vllm) in `kind` (a dtype or quantization; default per format) to `out`
    (default RUN/export/TO-KIND), then, with `verify`, run the release gate on it. `out` must be new or empty;
    with `force` it may also hold an earlier export of ayar's, which is replaced (never anything else)."""
    from ayar.errors import AyarError

    if to not in FORMATS:
        raise AyarError(f"export format {to!r}: choose one of {', '.join(FORMATS)}")
    fmt = FORMATS[to]
    kind = kind or fmt.default_kind  # each writer checks its own kinds, naming the flag
    folder = Path(out or Path(run_dir) / "export" / f"{to}-{kind}")
    artifact = Path(fmt.write(run_dir, folder, kind, log, force))
    result = Export(folder, artifact, to, kind)
    if verify:
        result.gate = gate(run_dir, result, max_new_tokens, log)
    return result


def gate(run_dir, export: Export, max_new_tokens: int = 48, log=print) -> GateReport:
    """The release gate on a written export: loaded in its own runtime, compared with the run's model;
    PASS/FAIL per check logged, gate.json written beside the export."""
    from ayar.exports.gate import verify
    from ayar.exports.merged import load_run

    log("release gate: the export against the run's model")
    engine, _ = load_run(run_dir, log=lambda *_: None)
    report = verify(
        engine, FORMATS[export.to].load(export.artifact), export.kind, str(export.artifact), max_new_tokens, log=log
    )
    report.write(export.folder / "gate.json")
    for c in report.checks:
        log(f"  {'[green]PASS[/]' if c.ok else '[red]FAIL[/]'}  {c.name}: {c.detail}")
    log(f"gate {'passed' if report.ok else 'FAILED'}: {export.folder / 'gate.json'}")
    return report
