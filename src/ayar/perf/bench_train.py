"""`ayar bench train`: ayar's training against plain TRL `SFTTrainer` + peft, in one invocation.

Both sides get the same model, the same rows (written once to a shared file), the same batches in the
same order (TRL's sampler is replaced by ayar's seeded order), the same LoRA config, effective batch,
max_length, learning rate and schedule, steps and seed, and the same loss masking (loss on the answer
only: TRL's prompt/completion mode). Each side runs in a fresh subprocess, so peak RSS is its own.

    python -m ayar.perf.bench_train SIDE SPEC.json     (the worker; prints one JSON line)
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = ("ayar", "trl")


def run_bench(cfg, steps: int = 8, warmup: int = 2, rows: int = 512, sides=SIDES, log=print) -> dict:
    """Run each side in its own process and return their measurements and the ayar/TRL ratios."""
    from ayar.config import config_to_dict
    from ayar.data.dataset import load_records, parse_sources
    from ayar.data.writers import write_records
    from ayar.errors import AyarError
    from ayar.perf.peak import matmul_gflops
    from ayar.models.load import resolve_model_path

    import torch

    if steps <= warmup:
        raise AyarError(f"--steps ({steps}) must be larger than --warmup ({warmup}): warm-up steps are not timed")
    records = [r for src in parse_sources(cfg.data.train, cfg.data.format, cfg.data.columns) for r in load_records(src)][:rows]
    records = [r for r in records if r.kind == "chat" and r.messages[-1]["role"] == "assistant"]
    if len(records) < cfg.training.batch_size * cfg.training.grad_accum:
        raise AyarError(f"only {len(records)} usable chat rows in {cfg.data.train}; need at least one batch")
    with tempfile.TemporaryDirectory(prefix="ayar-bench-") as tmp:
        data = write_records(records, "messages", Path(tmp) / "rows.jsonl")
        spec = {"config": config_to_dict(cfg), "model_path": resolve_model_path(cfg.model.name, log=log), "data": str(data),
                "steps": steps, "warmup": warmup, "tmp": tmp, "trl_bf16": trl_bf16(cfg)}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        # bf16 only where something computes in it: emulated bf16 matmuls (CPUs without AVX512-BF16/AMX)
        # run at ~0.3 GFLOP/s, and measuring them would take minutes
        peak = {"fp32": matmul_gflops(torch.float32)}
        if spec["trl_bf16"]:
            peak["bf16"] = matmul_gflops(torch.bfloat16)
        log("matmul peak on this machine: " + ", ".join(f"{v:.0f} GFLOP/s {k}" for k, v in peak.items()))
        results = {}
        for side in sides:
            log(f"running {side}: {steps} steps ({warmup} warm-up), batch {cfg.training.batch_size} x {cfg.training.grad_accum}, "
                f"max_length {cfg.data.max_length}, {len(records)} rows ...")
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "ayar.perf.bench_train", side, str(spec_path)],
                                  capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if proc.returncode != 0:
                raise AyarError(f"the {side} benchmark failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[side]["wall_seconds"] = round(time.perf_counter() - t, 1)
    for r in results.values():
        r["gflops"] = 4 * r["params"] * r["tokens_per_s"] / 1e9
        r["pct_peak"] = 100 * r["gflops"] / peak["bf16" if "bf" in r["dtype"] else "fp32"]
    out = {"sides": results, "peak_gflops": peak, "steps": steps, "warmup": warmup, "rows": len(records),
           "batch_size": cfg.training.batch_size, "grad_accum": cfg.training.grad_accum, "max_length": cfg.data.max_length,
           "model": cfg.model.name}
    if "ayar" in results and "trl" in results:
        a, t = results["ayar"], results["trl"]
        out["ratios"] = {"tokens_per_s": a["tokens_per_s"] / t["tokens_per_s"], "peak_rss": a["peak_rss_mb"] / t["peak_rss_mb"],
                         "median_step": a["median_step_s"] / t["median_step_s"],
                         "final_loss": a["final_loss"] / t["final_loss"]}
    return out


def trl_bf16(cfg) -> bool:
    """TRL's precision: bf16 autocast (its default, `bf16=True`) where the hardware computes in bf16, fp32
    elsewhere. On a CPU without native bf16 its default would emulate every matmul, hundreds of times
    slower than fp32 (0.3 vs 72 GFLOP/s measured on an AVX2 CPU): no user would keep it, so the baseline
    uses the precision ayar picks for the same hardware."""
    from ayar.models.device import choose_placement

    import torch

    return choose_placement(cfg.model.device, cfg.model.dtype).dtype != torch.float32


# --- the worker: one side, in its own process ----------------------------------------------------

def _summary(step_seconds: list[float], tokens: list[int], losses: list[float], warmup: int, params: int) -> dict:
    timed_s, timed_tok = step_seconds[warmup:], tokens[warmup:]
    tail = losses[-max(1, len(losses) // 4):]
    return {"median_step_s": statistics.median(timed_s), "tokens_per_s": sum(timed_tok) / sum(timed_s),
            "real_tokens_per_step": sum(tokens) / len(tokens), "final_loss": sum(tail) / len(tail), "losses": losses,
            "step_seconds": step_seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params": params}


def _ayar(spec: dict) -> dict:
    from ayar.config import TrainConfig
    from ayar.config.loader import from_dict
    from ayar.quiet import quiet_libraries
    from ayar.train.sft import train_sft

    quiet_libraries()
    cfg = from_dict(TrainConfig, spec["config"])
    cfg.model.name = spec["model_path"]
    cfg.data.train, cfg.data.format, cfg.data.columns = spec["data"], "messages", {}
    cfg.data.val_ratio, cfg.data.test_ratio, cfg.data.validation, cfg.data.test = 0.0, 0.0, None, None
    cfg.data.lint, cfg.data.cache = "warn", False
    cfg.training.max_steps, cfg.training.tracker, cfg.training.save_steps = spec["steps"], "none", 0
    cfg.output.dir, cfg.output.name = spec["tmp"], "bench-ayar"
    from rich.console import Console

    run = train_sft(cfg, console=Console(stderr=True, quiet=True))
    recs = [r for r in run.read_metrics() if "loss" in r]
    meta = run.read_meta()
    tokens = [round(r["tokens_per_s"] * r["step_seconds"]) for r in recs]
    out = _summary([r["step_seconds"] for r in recs], tokens, [r["loss"] for r in recs], spec["warmup"], meta["params"]["total"] - meta["params"]["trainable"])
    out["dtype"] = meta["dtype"]
    out["passes"] = meta.get("passes")
    return out


def _trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from ayar.quiet import quiet_libraries
    from ayar.train.loop import BatchOrder

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
    peft_config = LoraConfig(r=lc["r"], lora_alpha=lc["alpha"], lora_dropout=lc["dropout"], task_type="CAUSAL_LM",
                             target_modules=targets)
    args = SFTConfig(output_dir=str(Path(spec["tmp"]) / "trl"), per_device_train_batch_size=tc["batch_size"],
                     gradient_accumulation_steps=tc["grad_accum"], max_length=c["data"]["max_length"],
                     learning_rate=tc["learning_rate"], lr_scheduler_type=tc["lr_scheduler"],
                     warmup_steps=round(tc["warmup_ratio"] * spec["steps"]), max_steps=spec["steps"], weight_decay=tc["weight_decay"],
                     max_grad_norm=tc["max_grad_norm"], logging_steps=1, save_strategy="no", report_to="none", seed=tc["seed"],
                     dataloader_num_workers=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
                     bf16=spec["trl_bf16"])

    times, tokens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    class Trainer(SFTTrainer):
        def _get_train_sampler(self, *a, **kw):
            return SequentialSampler(self.train_dataset)

    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config, callbacks=[Timer()])
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    per_step = [sum(tokens[i * tc["grad_accum"]:(i + 1) * tc["grad_accum"]]) for i in range(len(times))]
    params = sum(p.numel() for n, p in trainer.model.named_parameters() if not p.requires_grad)
    out = _summary(times, per_step, losses, spec["warmup"], params)
    out["dtype"] = "bf16 autocast" if args.bf16 else "float32"
    out["gradient_checkpointing"] = args.gradient_checkpointing
    return out


if __name__ == "__main__":
    side, spec_file = sys.argv[1], sys.argv[2]
    result = {"ayar": _ayar, "trl": _trl}[side](json.loads(Path(spec_file).read_text()))
    print(json.dumps(result))
