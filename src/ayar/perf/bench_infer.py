"""`ayar bench infer`: a run's exports side by side on the same prompts: generation speed (greedy, one
stream) and perplexity of reference answers (teacher-forced), each against the fp32 merged model.

Every artifact is measured in its own runtime (transformers, onnxruntime-genai, llama.cpp) through the
same three calls the release gate uses (`prompt_ids`, `greedy`, `logprobs`). The token ids scored are the
same for all: the run's rendering of prompt + answer (all exports share the run's vocabulary).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

FORMATS = ("merged-fp32", "merged-bf16", "onnx-fp32", "onnx-int8", "onnx-int4", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m")


def artifact(run_dir: Path, fmt: str, log=print):
    """Load (exporting first if it is not there yet) one format of the run, in its own runtime."""
    from ayar.exports.workflow import FORMATS as WRITERS

    to, _, quant = fmt.partition("-")
    folder = run_dir / "export" / fmt
    if fmt in FORMATS:
        done = {
            "merged": folder / "config.json",
            "onnx": folder / "genai_config.json",
            "gguf": folder / f"model-{quant}.gguf",
        }[to]
        path = done if done.is_file() else Path(WRITERS[to].write(run_dir, folder, quant, log))
        return WRITERS[to].load(path if to == "gguf" else folder)
    from ayar.errors import AyarError

    raise AyarError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


def run_bench(run_dir: str | Path, formats=FORMATS, rows: int = 10, max_new_tokens: int = 64, log=print) -> dict:
    from ayar.data.dataset import load_records, parse_sources
    from ayar.exports.merged import load_run

    run_dir = Path(run_dir)
    engine, _ = load_run(run_dir, log=lambda *_: None)
    records = [r for s in parse_sources("sample:gsm8k-heldout") for r in load_records(s)][:rows]
    cases = []
    for rec in records:
        prompt = [m for m in rec.messages if m["role"] != "assistant"]
        ids = engine.tok(engine.renderer.prompt_text(prompt), add_special_tokens=engine.renderer.template == "alpaca")[
            "input_ids"
        ]
        answer = engine.tok(rec.messages[-1]["content"], add_special_tokens=False)["input_ids"]
        cases.append((ids, answer))
    results = {}
    for fmt in formats:
        log(f"[{fmt}] loading")
        art = artifact(run_dir, fmt, log=log)
        art.greedy(cases[0][0], 4)  # warm-up
        tokens, seconds, nll, scored = 0, 0.0, 0.0, 0
        for ids, answer in cases:
            started = time.perf_counter()
            tokens += len(art.greedy(ids, max_new_tokens))
            seconds += time.perf_counter() - started
            lp = art.logprobs(ids + answer)
            for i, token in enumerate(answer):
                nll -= float(lp[len(ids) - 1 + i, token])
            scored += len(answer)
        results[fmt] = {
            "tokens_per_s": tokens / seconds,
            "perplexity": math.exp(nll / scored),
            "size_mb": _size(run_dir / "export" / fmt),
        }
        log(f"[{fmt}] {results[fmt]['tokens_per_s']:.1f} tokens/s, perplexity {results[fmt]['perplexity']:.4f}")
        del art
    ref = results.get("merged-fp32")
    if ref:
        for r in results.values():
            r["speedup"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["perplexity_delta_pct"] = 100 * (r["perplexity"] / ref["perplexity"] - 1)
    return {"run": str(run_dir), "rows": len(cases), "max_new_tokens": max_new_tokens, "formats": results}


def _size(folder: Path) -> float:
    return (
        sum(f.stat().st_size for f in folder.rglob("*") if f.suffix in (".safetensors", ".onnx", ".data", ".gguf"))
        / 1e6
    )
