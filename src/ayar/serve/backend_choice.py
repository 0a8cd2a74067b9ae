"""Which runtime serves a run: `ayar serve RUN --backend auto` (the default of the command) picks, on a CPU, the
fastest backend for which the run has an export that passed its release gate, building the GGUF one once (q8_0,
gated, kept in RUN/export/) when there is none. Measured on this project's CPUs (benchmarks/README.md): llama.cpp
(GGUF) is the fastest, then onnxruntime-genai (int8), then transformers. A failed gate falls back to the
transformers backend with a warning naming the failed check; what needs transformers (a GPU, a model that is not a
run) keeps it, and the reason is said either way. Adapters chosen per request are served by llama.cpp from GGUF LoRA
exports on one base GGUF (built and gated once per run, like the GGUF export), or by transformers."""

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
    if wanted == "auto" and _gpu():
        return Choice(source, "transformers", "a GPU: the transformers backend (or --engine vllm) serves it there")
    if settings.adapters or settings.adapter_root:
        return _with_adapters(settings, wanted, log, build)
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


def _with_adapters(settings, wanted: str, log, build) -> Choice:
    """Adapters chosen per request: llama.cpp serves them when the run and every adapter run have a gated GGUF LoRA
    export (built once where missing) on the same base; otherwise transformers (auto) or an error."""
    source = settings.source
    if wanted == "onnx":
        raise AyarError("--backend onnx: adapters chosen per request need --backend gguf or transformers")
    if settings.adapter_root and wanted == "auto":  # what an admin loads later may have no GGUF LoRA export
        return Choice(source, "transformers", "adapters loaded at run time (--adapter-root) need it")
    fmt, kind = EXPORTS["gguf"][0], f"lora-{EXPORTS['gguf'][1]}"
    runs = {"the served run": Path(source), **{f"adapter {n}": Path(p) for n, p in settings.adapters.items()}}
    failed, base = [], _applies_to(Path(source))
    for what, run in runs.items():
        if not (run / "run.json").is_file():
            if run.suffix != ".gguf" and not any(run.glob("adapter*.gguf")):
                failed.append(f"{what} ({run}) is neither a run directory nor a GGUF LoRA")
            continue
        if _applies_to(run) != base:
            failed.append(f"{what} was trained on {_applies_to(run)}, the served run on {base}")
            continue
        folder = run / "export" / f"{fmt}-{kind}"
        gate = _gate(folder)
        if gate is None and not _missing("gguf"):
            log(f"backend: no gated GGUF LoRA export of {run} yet: building it once ({folder})")
            try:
                (build or _build)(str(run), fmt, kind, log)
            except AyarError as e:
                failed.append(f"{what}: the GGUF LoRA export failed ({e})")
            gate = _gate(folder)
        if gate is None:
            failed.append(f"{what}: {_missing('gguf') or 'no GGUF LoRA export'}")
        elif not gate["ok"]:
            bad = "; ".join(f"{c['name']}: {c['detail']}" for c in gate.get("checks", []) if not c["ok"])
            failed.append(f"{what}: GGUF LoRA release gate failed: {bad}")
    if not failed:
        folder = Path(source) / "export" / f"{fmt}-{kind}"
        return Choice(
            str(folder), "gguf", f"GGUF LoRA exports of the run and its {len(settings.adapters)} adapter(s) passed "
            f"their release gates: one base ({folder}), adapters applied per request by llama.cpp"
        )  # fmt: skip
    if wanted != "auto":
        raise AyarError(f"--backend gguf cannot serve these adapters: {failed[0]}")
    return Choice(source, "transformers", "adapters chosen per request", "falling back: " + " | ".join(failed))


def _applies_to(run: Path) -> str:
    from ayar.rundir import RunDir

    return RunDir.open(run).adapter_base()


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
