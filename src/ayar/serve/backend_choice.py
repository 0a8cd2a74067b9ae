"""Which runtime serves a run: `ayar serve RUN --backend auto` (the default of the command) picks, on a CPU, the
fastest backend for which the run has an export that passed its release gate, building the GGUF one once (q8_0,
gated, kept in RUN/export/) when there is none. Measured on this project's CPUs (benchmarks/README.md): llama.cpp
(GGUF) is the fastest, then onnxruntime-genai (int8), then transformers. A failed gate falls back to the
transformers backend with a warning naming the failed check; what needs transformers (adapters per request, a
GPU, a model that is not a run) keeps it, and the reason is said either way."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ayar.errors import AyarError

BACKENDS = ("auto", "transformers", "gguf", "onnx")
# fastest first, each with the export that serves it (format, kind)
EXPORTS = {"gguf": ("gguf", "q8_0"), "onnx": ("onnx", "int8")}


@dataclass
class Choice:
    source: str  # what load_engine gets: the run itself or an export folder
    backend: str  # transformers | gguf | onnx
    reason: str
    warning: str = ""


def choose_backend(settings, log=print, build=None) -> Choice:
    """The source to serve for `settings.backend`. `build(run, fmt, kind)` makes a gated export (default:
    exports.workflow.export_run); a test passes its own."""
    wanted, source = settings.backend, settings.source
    if wanted not in BACKENDS:
        raise AyarError(f"--backend {wanted}: choose one of {', '.join(BACKENDS)}")
    run = Path(source)
    is_run = (run / "run.json").is_file()
    if wanted == "transformers" or not is_run:
        why = "asked for" if wanted == "transformers" else "the source is not a run directory"
        if wanted in EXPORTS and not is_run:
            raise AyarError(f"--backend {wanted} serves an export of a run: give a run directory, or the export itself")
        return Choice(source, "transformers", why)
    if settings.adapters or settings.adapter_root:
        if wanted != "auto":
            raise AyarError(f"--backend {wanted}: adapters chosen per request need the transformers backend")
        return Choice(source, "transformers", "adapters chosen per request need it")
    if wanted == "auto" and _gpu():
        return Choice(source, "transformers", "a GPU: the transformers backend (or --engine vllm) serves it there")
    order = [wanted] if wanted != "auto" else list(EXPORTS)
    folder = {b: run / "export" / "-".join(EXPORTS[b]) for b in order}
    for backend in order:  # an export that already passed its gate, fastest first
        gate = _gate(folder[backend])
        if gate is not None and gate["ok"]:
            return Choice(str(folder[backend]), backend, f"{' '.join(EXPORTS[backend])} export passed its release "
                          f"gate ({folder[backend]}/gate.json)")  # fmt: skip
    first = order[0]  # none: build the fastest one once (its gate decides), unless it was built and failed
    failed = []
    if _gate(folder[first]) is None:
        missing = _missing(first)
        if missing:
            failed.append(f"{first}: {missing}")
        else:
            fmt, kind = EXPORTS[first]
            log(f"backend: no gated {fmt} {kind} export of this run yet: building it once ({folder[first]})")
            try:
                (build or _build)(str(run), fmt, kind, log)
            except AyarError as e:
                failed.append(f"{first}: the export failed ({e})")
            gate = _gate(folder[first])
            if gate is not None and gate["ok"]:
                return Choice(str(folder[first]), first, f"{fmt} {kind} export passed its release gate "
                              f"({folder[first]}/gate.json)")  # fmt: skip
    for backend in order:
        bad = [c for c in (_gate(folder[backend]) or {}).get("checks", []) if not c["ok"]]
        if bad:
            failed.append(f"{backend}: release gate failed: " + "; ".join(f"{c['name']}: {c['detail']}" for c in bad))
    if wanted != "auto":
        raise AyarError(f"--backend {wanted} cannot serve this run: {failed[0]}")
    return Choice(source, "transformers", "no gated export could serve it", "falling back: " + " | ".join(failed))


def _gate(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "gate.json").read_text())
    except (OSError, ValueError):
        return None


def _missing(backend: str) -> str:
    if backend == "gguf" and importlib.util.find_spec("llama_cpp") is None:
        return "llama.cpp's Python bindings are not installed (pip install 'ayar[gguf]')"
    if backend == "onnx" and importlib.util.find_spec("onnxruntime_genai") is None:
        return "onnxruntime-genai is not installed (pip install 'ayar[export]')"
    return ""


def _build(run: str, fmt: str, kind: str, log) -> None:
    from ayar.exports.workflow import export_run

    export_run(run, fmt, kind, log=lambda *_: None)


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()
