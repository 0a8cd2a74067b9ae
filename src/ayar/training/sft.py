"""Supervised fine-tuning on ayar's own loop: setup (plan, model, data, passes) -> fit -> save, on the shared
recipe skeleton (training/recipe.py).

    ayar train examples/quickstart.yaml
    ayar train examples/quickstart.yaml lora.r=32 training.max_steps=50
    ayar train --resume runs/quickstart-20261125-101500
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console

from ayar.config import TrainConfig
from ayar.data.dataset import prepare_data
from ayar.models.adapters import apply_method, parameter_counts, save_initial
from ayar.rundir import RunDir
from ayar.training import checkpoint as ckpt
from ayar.training import distributed, sharding, zero
from ayar.training.allocator import tune_allocator
from ayar.training.loop import LoopState, enable_checkpointing, run_loop, total_steps_for
from ayar.training.plan import decide
from ayar.training.progress import TrainProgress
from ayar.training.recipe import Recipe, loading_snippets, peaks_per_rank


def train_sft(
    cfg: TrainConfig | None = None, resume: str | Path | None = None, callbacks=(), console: Console | None = None
) -> RunDir:
    r = Recipe.open(cfg, resume, console)
    cfg, tcfg, say = r.cfg, r.cfg.training, r.say
    resume_from = None
    if r.resuming:
        ckpt.remove_stale_temp(r.run.checkpoints)
        resume_from = ckpt.latest_checkpoint(r.run.checkpoints)
        if resume_from is None:
            r.start_over()
    start_step = ckpt.checkpoint_step(resume_from) if resume_from else 0
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    torch.manual_seed(tcfg.seed)  # resume overwrites weights and RNG from the checkpoint

    # --- setup: plan, model, data, passes -------------------------------------------------------------
    plan = decide(cfg)
    if tcfg.return_memory and plan.device == "cpu":  # asked for: from the start, what loading frees goes back too
        tune_allocator()
    r.world = world = distributed.start(plan)  # several processes (torchrun, accelerate launch): rank 0 writes
    if not world.main:
        r.console = Console(stderr=True, quiet=True)
    model, tok, _, model_path = r.load_model(plan)
    say(
        f"model  {model_path}  ({plan.device}, {plan.placement.dtype_name}: {plan.placement.reason})"
        + (f", {str(plan.autocast).removeprefix('torch.')} autocast" if plan.autocast is not None else "")
        + (", Liger kernels" if plan.liger else "")
    )
    t0 = time.perf_counter()
    with distributed.main_first(world):  # rank 0 fills the tokenization cache, the others read it
        data = prepare_data(cfg.data, tok, seed=tcfg.seed, log=say)
    st = data.stats
    say(
        f"data   {st['train_rows']} train rows ({st['train_tokens']:,} tokens, {st['trained_tokens']:,} trained), "
        f"{st['val_rows']} validation rows"
        + (f", {st['truncated_rows']} truncated to {st['max_length']}" if st["truncated_rows"] else "")
        + f"; {'tokenized data from cache' if st['tokenization_cached'] else 'tokenized'} in "
        f"{time.perf_counter() - t0:.1f}s"
    )
    if plan.liger:
        from ayar.kernels import liger

        liger.apply(model)
    torch.manual_seed(tcfg.seed)  # the adapter's initialization depends on the seed alone, not on the steps above
    with zero.split_while_loading(plan, tcfg):  # ZeRO-3's split weights: peft gathers what it reads of them
        model = apply_method(model, cfg.method, cfg.lora)
    plan = plan.with_passes(cfg, model, data.train, say)
    allocator = tune_allocator() if plan.return_memory and plan.device == "cpu" else None
    if plan.layout.checkpointing:
        enable_checkpointing(model)
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False
    run = r.create()
    init_dir = run.path / "adapter_init"
    if resume_from is None and world.main:
        init_dir = save_initial(model, cfg.lora, init_dir)
    init_dir = init_dir if init_dir and Path(init_dir).is_dir() else None
    total_steps = total_steps_for(len(data.train), tcfg, world.size)
    r.record_start(tok, model_path, plan, *parameter_counts(model), st, allocator=allocator, total_steps=total_steps)
    say(plan.passes_line())
    if r.resuming and world.main:
        say(f"resume {resume_from.name}")
        run.truncate_metrics(start_step)
    if world.active:
        say(
            f"world  {world.size} processes ({'nccl' if plan.device.startswith('cuda') else 'gloo'}, "
            f"{_strategy(plan)}), global batch {tcfg.batch_size} x {world.size} x {tcfg.grad_accum} accumulation"
        )

    # --- fit ------------------------------------------------------------------------------------------
    r.begin_fit()
    wall = time.perf_counter()
    with TrainProgress(total_steps, start_step, r.console) as progress:

        def on_progress(state: LoopState, record: dict) -> None:
            rate = state.real_tokens / max(state.train_seconds, 1e-9)
            eta = (total_steps - state.step) * state.train_seconds / max(state.step, 1)
            progress.update(state.step, record["loss"], record["lr"], rate, eta)

        result = run_loop(
            model,
            data.train,
            data.val,
            tcfg,
            plan=plan,
            pad_id=tok.pad_token_id,
            ckpt_root=run.checkpoints,
            on_log=r.log,
            on_progress=on_progress,
            resume_from=resume_from,
            callbacks=callbacks,
            warn=say,
            world=world,
            stop_requested=r.stop_requested,
        )

    # --- save -----------------------------------------------------------------------------------------
    s = result.state
    if s.stopped:
        r.finish_stopped(s.step, result.total_steps)
        distributed.stop(world)
        return run
    if result.kept_best:
        say(
            f"keeping the best {'model' if cfg.method == 'full' else 'adapter'} (step {s.best_step}, eval loss "
            f"{s.best_eval:.4f})"
        )
    whole = None
    if plan.saving == "parts":  # FSDP: each process writes its parts of the model
        sharding.save_by_parts(result.parallel.root, model, run.full_model, world)
    else:  # split models (FSDP, ZeRO-3): the trained weights gathered whole on rank 0 (the model stays split)
        whole = result.parallel.whole_state()
    peaks = peaks_per_rank(world)
    if not world.main:
        distributed.stop(world)
        return run
    if plan.saving == "parts":
        tok.save_pretrained(run.full_model)
    else:
        r.save(model, tok, init_dir, whole)
    meta = r.finish(
        _run_readme,
        steps=s.step,
        total_steps=result.total_steps,
        stopped_early=s.stopped_early,
        best_step=s.best_step,
        best_eval_loss=s.best_eval,
        train_seconds=round(s.train_seconds, 2),
        wall_seconds=round(time.perf_counter() - wall, 2),
        tokens_per_s=round(s.real_tokens / max(s.train_seconds, 1e-9), 1),
        **peaks,
    )
    say(
        f"done   {s.step} steps in {meta['train_seconds']:.0f}s, {meta['tokens_per_s']:.0f} tokens/s, "
        f"final loss {meta['final_loss']:.4f}"
        + (f", eval loss {meta['final_eval_loss']:.4f}" if meta["final_eval_loss"] is not None else "")
    )
    say(f"run    {run.path}   (ayar chat {run.path})")
    distributed.stop(world)
    return run


def _strategy(plan) -> str:
    if plan.strategy == "fsdp":
        reads = {"parts": "each reads its parts of the weights", "rank0": "rank 0 reads the weights"}.get(
            plan.loading, "each reads the whole weights"
        )
        offload = ", offloaded to CPU RAM" if plan.distributed.offload else ""
        return f"FSDP {plan.distributed.shard} shard, a unit per decoder layer, {reads}{offload}"
    if plan.strategy == "deepspeed":
        split = "gradients and optimizer states" + (", weights" if plan.distributed.zero_stage == 3 else "")
        offload = ", offloaded to CPU RAM (DeepSpeed's CPU Adam)" if plan.cpu_adam else ""
        return f"DeepSpeed ZeRO-{plan.distributed.zero_stage}, {split} split across the processes{offload}"
    return "data parallel"


def _run_readme(run: RunDir, cfg: TrainConfig, meta: dict) -> str:
    ev = meta.get("final_eval_loss")
    return f"""# {run.path.name}

{"Full" if cfg.method == "full" else cfg.method.upper()} fine-tune of `{meta["base_model"]}` made by ayar
{meta["ayar_version"]} on {meta["created"]}.

| | |
|---|---|
| data | `{cfg.data.train}` ({meta["data"]["train_rows"]} train / {meta["data"]["val_rows"]} validation rows) |
| method | {cfg.method} r={cfg.lora.r} alpha={cfg.lora.alpha} targets={cfg.lora.target_modules} |
| steps | {meta["steps"]} of {meta["total_steps"]}{" (stopped early)" if meta["stopped_early"] else ""} |
| final train loss | {meta["final_loss"]:.4f} |
| final eval loss | {f"{ev:.4f}" if ev is not None else "n/a"} |
| device / dtype | {meta["device"]} / {meta["dtype"]} |
| speed | {meta["tokens_per_s"]} tokens/s, {meta["train_seconds"]} s training, peak RSS {meta["peak_rss_mb"]} MB |

Files: `config.yaml` (resolved config),
`{"model/` (the whole model" if cfg.method == "full" else "adapter/` (adapter weights"}, safetensors), `tokenizer/`,
`checkpoints/` (resumable), `metrics.jsonl`, `loss.png`, `tb/` (TensorBoard: `tensorboard --logdir {run.path}/tb`).

    ayar chat {run.path}
    ayar train --resume {run.path}

{loading_snippets(run, cfg, meta)}"""
