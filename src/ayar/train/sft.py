"""Supervised fine-tuning: load -> prepare -> train -> save, top to bottom.

    ayar train examples/quickstart.yaml
    ayar train examples/quickstart.yaml lora.r=32 training.max_steps=50
    ayar train --resume runs/quickstart-20261125-101500
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console

from ayar.config import TrainConfig, config_to_dict
from ayar.config.loader import from_dict
from ayar.data.dataset import prepare_data
from ayar.errors import AyarError
from ayar.fsutil import write_atomic
from ayar.models.adapters import apply_method, parameter_counts, quantization_config, save_initial, save_trained
from ayar.models.load import load_model_and_tokenizer
from ayar.perf.allocator import tune_allocator
from ayar.train import checkpoint as ckpt
from ayar.train.loop import LoopState, describe_passes, enable_checkpointing, run_loop, total_steps_for
from ayar.train.plots import plot_loss
from ayar.train.progress import TrainProgress
from ayar.train.rundir import RunDir, peak_rss_mb, start_meta
from ayar.train.tracking import Tracker


def train_sft(cfg: TrainConfig | None = None, resume: str | Path | None = None, callbacks=(), console: Console | None = None) -> RunDir:
    console = console or Console(stderr=True)
    say = lambda text: console.print(text, soft_wrap=True, highlight=False)

    # --- run directory (new, or the one being resumed) -------------------------------------------
    if resume is not None:
        run = RunDir.open(resume)
        cfg = from_dict(TrainConfig, run.read_config_dict(), where=str(run.config))
        resume_from = ckpt.latest_checkpoint(run.checkpoints)
        if resume_from is None:
            raise AyarError(f"{run.path} has no complete checkpoint to resume from (set training.save_steps to write them)")
        ckpt.remove_stale_temp(run.checkpoints)
    else:
        run, resume_from = None, None  # created once the data and model are ready: a bad config leaves no empty run
    start_step = ckpt.checkpoint_step(resume_from) if resume_from else 0
    tcfg = cfg.training
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    torch.manual_seed(tcfg.seed)  # LoRA init; resume overwrites weights and RNG from the checkpoint

    # --- load ------------------------------------------------------------------------------------
    placement_cfg, amp = full_precision(cfg)
    model, tok, placement, model_path = load_model_and_tokenizer(placement_cfg, log=say, **quantized(cfg))
    if amp is not None:
        model.ayar_autocast_dtype = amp
    say(f"model  {model_path}  ({placement.device}, {placement.dtype_name}: {placement.reason})"
        + (f", {str(amp).removeprefix('torch.')} autocast" if amp is not None else ""))

    # --- prepare ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    data = prepare_data(cfg.data, tok, seed=tcfg.seed, log=say)
    st = data.stats
    say(f"data   {st['train_rows']} train rows ({st['train_tokens']:,} tokens, {st['trained_tokens']:,} trained), "
        f"{st['val_rows']} validation rows" + (f", {st['truncated_rows']} truncated to {st['max_length']}" if st["truncated_rows"] else "")
        + f"; {'tokenized data from cache' if st['tokenization_cached'] else 'tokenized'} in {time.perf_counter() - t0:.1f}s")
    checkpointing, return_memory = _check_memory(cfg, model, data.train, placement, say)
    allocator = tune_allocator() if return_memory and placement.device == "cpu" else None
    if run is None:
        run = RunDir.create(cfg.output.dir, cfg.output.name)
        run.write_config(config_to_dict(cfg))
    model = apply_method(model, cfg.method, cfg.lora)
    if checkpointing:
        enable_checkpointing(model)
    init_dir = run.path / "adapter_init"
    if resume_from is None:
        init_dir = save_initial(model, cfg.lora, init_dir)
    init_dir = init_dir if init_dir and Path(init_dir).is_dir() else None
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False
    trainable, total = parameter_counts(model)
    say(f"params {trainable:,} trainable / {total:,} total ({100 * trainable / total:.3f}%)")
    passes = describe_passes(model, tcfg, placement.device)
    say(f"passes {passes['rows_per_pass'] or 'all'} rows each, {'padding-free' if passes['padding_free'] else 'padded'}, "
        + ("fused decoder" if passes["fused"] else f"transformers + peft modules ({passes['not_fused_because']})")
        + (", gradient checkpointing" if passes["gradient_checkpointing"] else ""))
    if resume_from is None:
        tok.save_pretrained(run.tokenizer)
        run.update_meta(**start_meta(cfg, model_path, placement, trainable, total, st), passes=passes, allocator=allocator)
    else:
        say(f"resume {resume_from.name}")
        run.truncate_metrics(start_step)

    # --- train -----------------------------------------------------------------------------------
    tracker = Tracker(tcfg.tracker, run, config_to_dict(cfg))

    def on_log(record: dict) -> None:
        run.append_metrics(record)
        tracker.log(record, record["step"])

    total_steps = total_steps_for(len(data.train), tcfg)
    wall = time.perf_counter()
    with TrainProgress(total_steps, start_step, console) as progress:
        def on_progress(state: LoopState, record: dict) -> None:
            rate = state.real_tokens / max(state.train_seconds, 1e-9)
            eta = (total_steps - state.step) * state.train_seconds / max(state.step, 1)
            progress.update(state.step, record["loss"], record["lr"], rate, eta)

        result = run_loop(model, data.train, data.val, tcfg, pad_id=tok.pad_token_id, device=placement.device,
                          ckpt_root=run.checkpoints, on_log=on_log, on_progress=on_progress, resume_from=resume_from,
                          callbacks=callbacks, warn=say)
    tracker.close()

    # --- save ------------------------------------------------------------------------------------
    if result.best_adapter is not None and result.state.best_step != result.state.step:
        ckpt.load_trained_state(model, result.best_adapter)
        say(f"keeping the best {'model' if cfg.method == 'full' else 'adapter'} (step {result.state.best_step}, "
            f"eval loss {result.state.best_eval:.4f})")
    save_trained(model, run.full_model if cfg.method == "full" else run.adapter, init_dir)  # safetensors
    records = run.read_metrics()
    plot_loss(records, run.loss_plot)
    s = result.state
    meta = run.update_meta(
        status="completed", steps=s.step, total_steps=result.total_steps, stopped_early=s.stopped_early,
        best_step=s.best_step, best_eval_loss=s.best_eval,
        final_loss=next((r["loss"] for r in reversed(records) if "loss" in r), None),
        final_eval_loss=next((r["eval_loss"] for r in reversed(records) if r.get("eval_loss") is not None), None),
        train_seconds=round(s.train_seconds, 2), wall_seconds=round(time.perf_counter() - wall, 2),
        tokens_per_s=round(s.real_tokens / max(s.train_seconds, 1e-9), 1), peak_rss_mb=peak_rss_mb(),
    )
    write_atomic(run.readme, _run_readme(run, cfg, meta))
    say(f"done   {s.step} steps in {meta['train_seconds']:.0f}s, {meta['tokens_per_s']:.0f} tokens/s, "
        f"final loss {meta['final_loss']:.4f}" + (f", eval loss {meta['final_eval_loss']:.4f}" if meta["final_eval_loss"] is not None else ""))
    say(f"run    {run.path}   (ayar chat {run.path})")
    return run


def full_precision(cfg: TrainConfig):
    """(model config to load with, autocast dtype or None). Full fine-tuning keeps fp32 master weights and
    computes in the half dtype the placement picks; adapters train in fp32 over a half-precision base anyway."""
    from dataclasses import replace

    from ayar.models.device import choose_placement

    if cfg.method != "full":
        return cfg.model, None
    placement = choose_placement(cfg.model.device, cfg.model.dtype)
    if placement.dtype == torch.float32:
        return cfg.model, None
    return replace(cfg.model, dtype="float32"), placement.dtype


def quantized(cfg: TrainConfig) -> dict:
    """QLoRA/QDoRA: load the base in 4-bit NF4, computing in the dtype the placement picks."""
    from ayar.models.device import choose_placement

    q = quantization_config(cfg.method, choose_placement(cfg.model.device, cfg.model.dtype).dtype)
    return {"quantization_config": q} if q is not None else {}


def _check_memory(cfg: TrainConfig, model, examples, placement, say) -> tuple[bool, bool]:
    """Stop before the first step (not by OOM mid-run) when the predicted peak cannot fit. Returns whether
    to checkpoint activations (`training.gradient_checkpointing`, or auto: when needed to fit) and whether
    to return freed memory at once (`training.return_memory`, or auto: when the plan is tight, since the
    default allocator's peak can run up to 2x above what training holds, and returning costs speed)."""
    choice, release = cfg.training.gradient_checkpointing, cfg.training.return_memory
    if cfg.training.memory_check == "off":
        return bool(choice), bool(release)
    from ayar.perf.plan import model_shape, plan_from_examples

    plan, fixes, layout = plan_from_examples(model_shape(model.config, cfg.lora.target_modules, cfg.lora.r), cfg, examples, placement)
    gb = lambda b: f"{b / 2**30:.1f} GB"
    if release is None:
        release = 2 * plan.total > plan.available
    if plan.fits:
        auto = " (gradient checkpointing on: the run would not fit without it)" if layout.checkpointing and choice is None else ""
        say(f"memory predicted peak {gb(plan.total)} of {gb(plan.available)} available{auto}"
            + (", freed memory returned at once" if release else ""))
        return layout.checkpointing, release
    message = (f"predicted peak memory {gb(plan.total)} exceeds the {gb(plan.available)} available ({plan.device}):\n{plan.table()}\n"
               + ("settings that would fit: " + "; ".join(fixes) if fixes else "no single setting change found that fits"))
    if cfg.training.memory_check == "strict":
        raise AyarError(message + "\n(train anyway with training.memory_check=warn)")
    say(f"warning: {message}")
    return layout.checkpointing, release


def _run_readme(run: RunDir, cfg: TrainConfig, meta: dict) -> str:
    ev = meta.get("final_eval_loss")
    return f"""# {run.path.name}

{'Full' if cfg.method == 'full' else cfg.method.upper()} fine-tune of `{meta['base_model']}` made by ayar {meta['ayar_version']} on {meta['created']}.

| | |
|---|---|
| data | `{cfg.data.train}` ({meta['data']['train_rows']} train / {meta['data']['val_rows']} validation rows) |
| method | {cfg.method} r={cfg.lora.r} alpha={cfg.lora.alpha} targets={cfg.lora.target_modules} |
| steps | {meta['steps']} of {meta['total_steps']}{' (stopped early)' if meta['stopped_early'] else ''} |
| final train loss | {meta['final_loss']:.4f} |
| final eval loss | {f'{ev:.4f}' if ev is not None else 'n/a'} |
| device / dtype | {meta['device']} / {meta['dtype']} |
| speed | {meta['tokens_per_s']} tokens/s, {meta['train_seconds']} s training, peak RSS {meta['peak_rss_mb']} MB |

Files: `config.yaml` (resolved config), `{'model/` (the whole model' if cfg.method == 'full' else 'adapter/` (adapter weights'}, safetensors), `tokenizer/`,
`checkpoints/` (resumable), `metrics.jsonl`, `loss.png`, `tb/` (TensorBoard: `tensorboard --logdir {run.path}/tb`).

    ayar chat {run.path}
    ayar train --resume {run.path}
"""
