"""`ayar bench train`: ayar's training against plain TRL `SFTTrainer` + peft, in one invocation.

Both sides get the same model, the same rows (written once to a shared file), the same batches in the
same order (TRL's sampler is replaced by ayar's seeded order), the same LoRA config, effective batch,
max_length, learning rate and schedule, steps and seed, and the same loss masking (loss on the answer
only: TRL's prompt/completion mode). Each side runs in a fresh subprocess, so peak RSS is its own.

On CPU the two processes take their steps in turns (`lockstep`): after its first step each side waits
for the parent's go before each next step, and the sides alternate which goes first. A shared machine's
speed drifts over minutes (one side's steps measured 30 % faster in one run than in the run before it),
and run one after the other, whichever side met the faster stretch came out ahead.

    python -m ayar.perf.bench_train SIDE SPEC.json     (the worker; prints one JSON line)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = ("ayar", "trl")


def run_bench(cfg, steps: int = 8, warmup: int = 2, rows: int = 512, sides=SIDES, log=print) -> dict:
    """Run each side in its own process and return their measurements and the ayar/TRL ratios."""
    import torch

    from ayar.config import config_to_dict
    from ayar.data.dataset import load_records, parse_sources
    from ayar.data.writers import write_records
    from ayar.errors import AyarError
    from ayar.models.load import resolve_model_path
    from ayar.perf.peak import matmul_gflops

    if steps <= warmup:
        raise AyarError(f"--steps ({steps}) must be larger than --warmup ({warmup}): warm-up steps are not timed")
    records = [
        r for src in parse_sources(cfg.data.train, cfg.data.format, cfg.data.columns) for r in load_records(src)
    ][:rows]
    records = [r for r in records if r.kind == "chat" and r.messages[-1]["role"] == "assistant"]
    if len(records) < cfg.training.batch_size * cfg.training.grad_accum:
        raise AyarError(f"only {len(records)} usable chat rows in {cfg.data.train}; need at least one batch")
    with tempfile.TemporaryDirectory(prefix="ayar-bench-") as tmp:
        data = write_records(records, "messages", Path(tmp) / "rows.jsonl")
        spec = {
            "config": config_to_dict(cfg),
            "model_path": resolve_model_path(cfg.model.name, log=log),
            "data": str(data),
            "steps": steps,
            "warmup": warmup,
            "tmp": tmp,
            "trl_bf16": trl_bf16(cfg),
        }
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        # bf16 only where something computes in it: emulated bf16 matmuls (CPUs without AVX512-BF16/AMX)
        # run at ~0.3 GFLOP/s, and measuring them would take minutes
        peak = {"fp32": matmul_gflops(torch.float32)}
        if spec["trl_bf16"]:
            peak["bf16"] = matmul_gflops(torch.bfloat16)
        log("matmul peak on this machine: " + ", ".join(f"{v:.0f} GFLOP/s {k}" for k, v in peak.items()))
        what = (
            f"{steps} steps ({warmup} warm-up), batch {cfg.training.batch_size} x {cfg.training.grad_accum}, "
            f"max_length {cfg.data.max_length}, {len(records)} rows"
        )
        lockstep = len(sides) > 1 and not torch.cuda.is_available()  # on a GPU both would have to fit at once
        if lockstep:
            log(f"running {' and '.join(sides)} in turns, a step each: {what} ...")
            results = _run_lockstep(list(sides), spec_path, steps, Path(tmp))
        else:
            results = {}
            for side in sides:
                log(f"running {side}: {what} ...")
                results.update(_run_lockstep([side], spec_path, steps, Path(tmp)))
    for r in results.values():
        r["gflops"] = 4 * r["params"] * r["tokens_per_s"] / 1e9
        r["pct_peak"] = 100 * r["gflops"] / peak["bf16" if "bf" in r["dtype"] else "fp32"]
    out = {
        "sides": results,
        "peak_gflops": peak,
        "steps": steps,
        "warmup": warmup,
        "rows": len(records),
        "lockstep": lockstep,
        "batch_size": cfg.training.batch_size,
        "grad_accum": cfg.training.grad_accum,
        "max_length": cfg.data.max_length,
        "model": cfg.model.name,
    }
    if "ayar" in results and "trl" in results:
        a, t = results["ayar"], results["trl"]
        out["ratios"] = {
            "tokens_per_s": a["tokens_per_s"] / t["tokens_per_s"],
            "peak_rss": a["peak_rss_mb"] / t["peak_rss_mb"],
            "median_step": a["median_step_s"] / t["median_step_s"],
            "final_loss": a["final_loss"] / t["final_loss"],
        }
    return out


def _run_lockstep(sides: list[str], spec_path: Path, steps: int, tmp: Path) -> dict:
    """Start a worker per side; let each take its first step freely, then release one step at a time,
    alternating sides (and which side goes first), so no two timed steps overlap. One side: plain run."""
    from ayar.errors import AyarError

    procs, to_child, from_child, logs = {}, {}, {}, {}
    started = time.perf_counter()
    for side in sides:
        go_r, go_w = os.pipe()  # parent -> worker: one byte per step it may take
        done_r, done_w = os.pipe()  # worker -> parent: one byte per step it finished
        logs[side] = (open(tmp / f"{side}.out", "w+"), open(tmp / f"{side}.err", "w+"))
        procs[side] = subprocess.Popen(
            [sys.executable, "-m", "ayar.perf.bench_train", side, str(spec_path)],
            stdout=logs[side][0],
            stderr=logs[side][1],
            pass_fds=(go_r, done_w),
            env={**os.environ, "TQDM_DISABLE": "1", _SYNC_ENV: f"{go_r},{done_w}"},
        )
        os.close(go_r)
        os.close(done_w)
        to_child[side], from_child[side] = go_w, done_r

    def failed(side: str) -> AyarError:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        code = procs[side].wait()
        err = logs[side][1]
        err.seek(0)
        return AyarError(f"the {side} benchmark failed (exit {code}):\n{err.read()[-3000:]}")

    def finished_step(side: str) -> None:
        if os.read(from_child[side], 1) != b"s":
            raise failed(side)

    try:
        for side in sides:  # first steps (warm-up, compiling) run side by side
            finished_step(side)
        for step in range(2, steps + 1):
            for side in sides if step % 2 == 0 else sides[::-1]:
                os.write(to_child[side], b"g")
                finished_step(side)
        results = {}
        for side in sides:
            os.write(to_child[side], b"g")  # past the last step: finish and report
            if procs[side].wait() != 0:
                raise failed(side)
            out = logs[side][0]
            out.seek(0)
            results[side] = json.loads(out.read().strip().splitlines()[-1])
            results[side]["wall_seconds"] = round(time.perf_counter() - started, 1)
        return results
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for fd in (*to_child.values(), *from_child.values()):
            os.close(fd)
        for files in logs.values():
            for f in files:
                f.close()


def trl_bf16(cfg) -> bool:
    """TRL's precision: bf16 autocast (its default, `bf16=True`) where the hardware computes in bf16, fp32
    elsewhere. On a CPU without native bf16 its default would emulate every matmul, hundreds of times
    slower than fp32 (0.3 vs 72 GFLOP/s measured on an AVX2 CPU): no user would keep it, so the baseline
    uses the precision ayar picks for the same hardware."""
    import torch

    from ayar.training.plan import decide

    plan = decide(cfg)  # the run plan ayar's side makes: its compute dtype is the autocast one, if any
    return (plan.autocast or plan.placement.dtype) != torch.float32


# --- the worker: one side, in its own process ----------------------------------------------------

_SYNC_ENV = "AYAR_BENCH_SYNC"


class _Turns:
    """The worker's half of lockstep: after each step, say so and wait for the parent's go. Records each
    step's span (wall clock: from the go, or the start, to its end) for the results."""

    def __init__(self):
        fds = os.environ.get(_SYNC_ENV)
        self.go, self.done = (int(x) for x in fds.split(",")) if fds else (None, None)
        self.since, self.spans = time.time(), []

    def step_done(self) -> None:
        self.spans.append((self.since, time.time()))
        if self.done is not None:
            os.write(self.done, b"s")
            if os.read(self.go, 1) != b"g":
                raise SystemExit("the bench parent went away")
        self.since = time.time()


def _summary(step_seconds: list[float], tokens: list[int], losses: list[float], warmup: int, params: int) -> dict:
    from ayar.training.allocator import peak_rss_mb

    timed_s, timed_tok = step_seconds[warmup:], tokens[warmup:]
    tail = losses[-max(1, len(losses) // 4) :]
    return {
        "median_step_s": statistics.median(timed_s),
        "tokens_per_s": sum(timed_tok) / sum(timed_s),
        "real_tokens_per_step": sum(tokens) / len(tokens),
        "final_loss": sum(tail) / len(tail),
        "losses": losses,
        "step_seconds": step_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "params": params,
    }


def _ayar(spec: dict) -> dict:
    from ayar.config import TrainConfig
    from ayar.config.loader import from_dict
    from ayar.quiet import quiet_libraries
    from ayar.training.sft import train_sft

    quiet_libraries()
    cfg = from_dict(TrainConfig, spec["config"])
    cfg.model.name = spec["model_path"]
    cfg.data.train, cfg.data.format, cfg.data.columns = spec["data"], "messages", {}
    cfg.data.val_ratio, cfg.data.test_ratio, cfg.data.validation, cfg.data.test = 0.0, 0.0, None, None
    cfg.data.lint, cfg.data.cache = "warn", False
    cfg.training.max_steps, cfg.training.tracker, cfg.training.save_steps = spec["steps"], "none", 0
    cfg.output.dir, cfg.output.name = spec["tmp"], "bench-ayar"
    from rich.console import Console

    turns = _Turns()
    run = train_sft(cfg, console=Console(stderr=True, quiet=True), callbacks=[lambda state: turns.step_done()])
    recs = [r for r in run.read_metrics() if "loss" in r]
    meta = run.read_meta()
    tokens = [round(r["tokens_per_s"] * r["step_seconds"]) for r in recs]
    out = _summary(
        [r["step_seconds"] for r in recs],
        tokens,
        [r["loss"] for r in recs],
        spec["warmup"],
        meta["params"]["total"] - meta["params"]["trainable"],
    )
    out["dtype"] = meta["dtype"]
    out["passes"] = meta.get("passes")
    out["step_spans"] = turns.spans
    return out


def _trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from ayar.quiet import quiet_libraries
    from ayar.training.loop import BatchOrder

    quiet_libraries()
    c = spec["config"]
    tc, lc = c["training"], c["lora"]
    rows = [json.loads(line)["messages"] for line in Path(spec["data"]).read_text().splitlines()]
    # ayar's batch order, laid out so that TRL's sequential sampler yields the same batches
    order = BatchOrder(len(rows), tc["batch_size"], tc["seed"])
    seq, epoch, micro = [], 0, 0
    for _ in range(spec["steps"] * tc["grad_accum"]):
        if micro >= order.per_epoch:
            epoch, micro = epoch + 1, 0
        seq += order.indices(epoch, micro)
        micro += 1
    ds = Dataset.from_list([{"prompt": rows[i][:-1], "completion": rows[i][-1:]} for i in seq])

    torch.manual_seed(tc["seed"])
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    targets = lc["target_modules"]
    peft_config = LoraConfig(
        r=lc["r"], lora_alpha=lc["alpha"], lora_dropout=lc["dropout"], task_type="CAUSAL_LM", target_modules=targets
    )
    args = SFTConfig(
        output_dir=str(Path(spec["tmp"]) / "trl"),
        per_device_train_batch_size=tc["batch_size"],
        gradient_accumulation_steps=tc["grad_accum"],
        max_length=c["data"]["max_length"],
        learning_rate=tc["learning_rate"],
        lr_scheduler_type=tc["lr_scheduler"],
        warmup_steps=round(tc["warmup_ratio"] * spec["steps"]),
        max_steps=spec["steps"],
        weight_decay=tc["weight_decay"],
        max_grad_norm=tc["max_grad_norm"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=tc["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=spec["trl_bf16"],
    )

    times, tokens = [], []
    turns = _Turns()

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)
            turns.step_done()

    class Trainer(SFTTrainer):
        def _get_train_sampler(self, *a, **kw):
            return SequentialSampler(self.train_dataset)

    trainer = Trainer(
        model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config, callbacks=[Timer()]
    )
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        tokens.append(
            int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
        )
        return batch

    trainer.data_collator = counting
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    per_step = [sum(tokens[i * tc["grad_accum"] : (i + 1) * tc["grad_accum"]]) for i in range(len(times))]
    params = sum(p.numel() for n, p in trainer.model.named_parameters() if not p.requires_grad)
    out = _summary(times, per_step, losses, spec["warmup"], params)
    out["dtype"] = "bf16 autocast" if args.bf16 else "float32"
    out["gradient_checkpointing"] = args.gradient_checkpointing
    out["step_spans"] = turns.spans
    return out


if __name__ == "__main__":
    side, spec_file = sys.argv[1], sys.argv[2]
    result = {"ayar": _ayar, "trl": _trl}[side](json.loads(Path(spec_file).read_text()))
    print(json.dumps(result))
