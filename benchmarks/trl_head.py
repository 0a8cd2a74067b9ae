"""TRL's fused LM head on a CPU: its own vocabulary tiles (32,768 wide) against ayar's (kernels/trl_head.py).

Two measurements, each variant in its own fresh process, the variants alternating within each round:
- the head alone: `trl.kernels.ChunkedLogProbFunction` forward + backward on random hidden states (the best of 3),
  its peak memory above what the process held before, and how far the log-probabilities and gradients move;
- whole runs: `ayar train examples/dpo.yaml` (6 steps, no evaluation) on the longest hh-rlhf pairs, so that every
  batch is about as long as data.max_length; peak RSS and train seconds as run.json records them.

    .venv/bin/python benchmarks/trl_head.py ../shared/data/hh_rlhf/harmless_pairs.jsonl [--rounds 2] \
        [--out benchmarks/results-trl-head.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from fsdp_loading import ROOT, machine

TRL_WIDTH = 32768
# (positions, hidden, vocabulary, dtype): DPO batch 4 x 2 rows of ~384 tokens on SmolLM2-135M (hidden 576, vocabulary
# 49,152), the same in fp32, a 1.7B-wide hidden, and Qwen2.5-0.5B's shape (hidden 896, vocabulary 151,936)
HEAD_SHAPES = [(3064, 576, 49152, "bfloat16"), (3064, 576, 49152, "float32"), (3064, 2048, 49152, "bfloat16"),
               (1024, 896, 151936, "bfloat16")]  # fmt: skip

HEAD = r"""
import json, re, sys, time, torch
from trl.kernels import ChunkedLogProbFunction as F

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

n, hidden, vocab, dtype, width = json.loads(sys.argv[1])
dtype = getattr(torch, dtype)
torch.manual_seed(0)
w = torch.randn(vocab, hidden, dtype=dtype) * 0.02
h = torch.randn(n, hidden, dtype=dtype).requires_grad_()
t = torch.randint(0, vocab, (n,))
outputs = ("log_probs", "entropy", "mean_logits", "is_top1")  # what TRL's DPO asks of it
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here
best = 1e9
for _ in range(3):
    h.grad = None
    start = time.perf_counter()
    lp = F.apply(h, w, None, t, 1.0, width, None, 1.0, outputs)[0]
    lp.sum().backward()
    best = min(best, time.perf_counter() - start)
torch.save({"lp": lp.detach(), "grad": h.grad}, sys.argv[2])
print(json.dumps({"seconds": best, "peak_mb": (status("VmHWM") - before) / 2**20}))
"""

# `ayar train` with the tile width as TRL sets it (ayar's module constant put back before the run)
TRAIN = ("import sys, ayar.kernels.trl_head as h; h.CPU_VOCAB_CHUNK = int(sys.argv.pop(1)); "
         "from ayar.cli import main; raise SystemExit(main(sys.argv[1:]))")  # fmt: skip


def head(shape, width: int, out: Path) -> dict:
    cmd = [sys.executable, "-c", HEAD, json.dumps([*shape, width]), str(out)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def longest_pairs(path: str, n: int, out: Path) -> Path:
    from ayar.data.dataset import load_records
    from ayar.data.records import Record
    from ayar.data.render import Renderer
    from ayar.data.writers import write_records
    from ayar.models.load import load_tokenizer, resolve_model_path

    records = load_records(path)[:4000]
    renderer = Renderer(load_tokenizer(resolve_model_path("default", log=lambda m: None)), max_length=100_000)
    # prompts short enough that TRL's DPO keeps the pair (it drops one whose prompt fills max_length)
    records = [r for r in records if len(renderer.tok(renderer.prompt_text(r.messages))["input_ids"]) <= 200]
    size = lambda r: min(
        len(renderer.render(Record(r.messages, r.where, chosen=c)).input_ids) for c in (r.chosen, r.rejected)
    )
    records.sort(key=size, reverse=True)
    return write_records(records[:n], "preference", out)


def patched_train(code: str, variant: str, overrides: list[str], out: Path) -> dict:
    """`ayar train` in a fresh process, `code` run first (it takes `variant` from the command line and sets ayar up
    that way); the peak RSS, train seconds, final loss and dtype its run.json records."""
    cmd = [sys.executable, "-c", code, variant, "train", *overrides, f"output.path={out}"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = json.loads((out / "run.json").read_text())
    return {k: meta[k] for k in ("peak_rss_mb", "train_seconds", "final_loss")} | {"dtype": meta["plan"]["dtype"]}


def train(data: Path, width: int, out: Path) -> dict:
    overrides = [str(ROOT / "examples" / "dpo.yaml"), f"data.train={data}", "training.max_steps=6",
                 "training.eval_steps=0", "data.val_ratio=0", "training.tracker=none", "data.lint=warn"]  # fmt: skip
    return patched_train(TRAIN, str(width), overrides, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", help="hh-rlhf pairs (jsonl)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results-trl-head.json"))
    args = ap.parse_args()
    from ayar.kernels.trl_head import CPU_VOCAB_CHUNK

    results = {"machine": machine(), "head": [], "runs": []}
    widths = (TRL_WIDTH, CPU_VOCAB_CHUNK)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for shape in HEAD_SHAPES:
            got = {w: head(shape, w, tmp / f"{w}.pt") for w in widths}
            a, b = (__import__("torch").load(tmp / f"{w}.pt") for w in widths)
            row = {"shape": shape, **{str(w): got[w] for w in widths},
                   "lp_max_diff": float((a["lp"] - b["lp"]).abs().max()),
                   "grad_max_diff": float((a["grad"].float() - b["grad"].float()).abs().max()),
                   "grad_max": float(a["grad"].float().abs().max())}  # fmt: skip
            results["head"].append(row)
            print(json.dumps(row), flush=True)
        data = longest_pairs(args.pairs, 64, tmp / "longest.jsonl")
        for r in range(args.rounds):
            for w in widths if r % 2 == 0 else widths[::-1]:
                row = {"width": w, "round": r + 1, **train(data, w, tmp / f"run-{w}-{r}")}
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
