"""The recipe shared by stages that run on a transformers/TRL Trainer (DPO family, reward model, GRPO,
classification): load -> prepare -> train -> save, into the same self-describing run directory as SFT.

A stage module supplies a `Stage`: how to load its model, which records it accepts, and how to build its
trainer; everything else (run directory, arguments, metrics, resume, saving) is here, once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from ayar.config import TrainConfig
from ayar.data.dataset import Splits, enforce_lint, load_splits
from ayar.errors import AyarError, DataError
from ayar.kernels import trl_head
from ayar.models.adapters import parameter_counts, trainable_in_fp32
from ayar.rundir import RunDir
from ayar.training import distributed, sharding, zero
from ayar.training.allocator import tune_allocator
from ayar.training.optim import trainer_optimizer_args
from ayar.training.plan import decide
from ayar.training.recipe import Recipe, loading_snippets, peaks_per_rank


@dataclass
class Stage:
    name: str
    kinds: tuple[str, ...]  # record kinds the stage trains on (data/records.py)
    # (cfg, model, tokenizer, splits, training-argument kwargs, callbacks) -> a transformers Trainer
    build: Callable
    auto_class: str | None = None  # transformers Auto class name; None: causal LM
    model_kwargs: Callable[[TrainConfig, Splits], dict] = lambda cfg, splits: {}
    # (cfg, trainer, splits) -> results measured after training (held-out accuracy, ...), put in run.json
    after: Callable | None = None
    before: Callable | None = None  # the same measurement before training, for before/after numbers
    renames: dict = field(default_factory=dict)  # Trainer log keys -> metrics.jsonl keys


def run_stage(
    cfg: TrainConfig | None, stage: Stage, resume: str | Path | None = None, console: Console | None = None
) -> RunDir:
    r = Recipe.open(cfg, resume, console)
    cfg, tcfg, say = r.cfg, r.cfg.training, r.say
    if r.resuming and not any(r.run.checkpoints.glob("checkpoint-*")):
        r.start_over()
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    if tcfg.return_memory:  # asked for: from the start, what loading frees goes back too
        tune_allocator()
    torch.manual_seed(tcfg.seed)

    # --- setup: plan, data (first: a wrong format fails before the model loads), model, trainer -------
    plan = decide(cfg)
    r.world = world = distributed.start(plan)  # under torchrun / accelerate: the Trainer shares this group
    if not world.main:
        r.console = Console(stderr=True, quiet=True)
    with distributed.main_first(world):  # bad data said once, by rank 0
        splits = load_splits(cfg.data, seed=tcfg.seed)
        check_kinds(splits, stage)
        _lint(cfg, splits, say)
        say(f"data   {len(splits.train)} train rows, {len(splits.val)} validation rows ({stage.name})")
    auto = getattr(__import__("transformers"), stage.auto_class) if stage.auto_class else None
    # under FSDP into CPU RAM, on GPUs too: splitting moves each part to its GPU, none holds the whole model; with
    # rank-0 loading the others build it empty and accelerate sends them their parts (plan.rank0_loading); under
    # ZeRO-3 built split as it loads (plan.splits_while_loading)
    model, tok, _, model_path = r.load_model(plan, auto_class=auto, **stage.model_kwargs(cfg, splits))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id  # sequence classifiers find each row's last token by it
    say(f"model  {model_path}  ({plan.device}, {plan.placement.dtype_name}: {plan.placement.reason})")
    _say_drops(cfg, tok, splits, say)
    plan = plan.with_trainer_memory(cfg, model, tok, splits.train, say)
    if plan.return_memory and not tcfg.return_memory:  # the plan is tight: from here on
        tune_allocator()
    run = r.create()
    logger = _MetricsLog(r, stage.renames)
    r.begin_fit()
    with sharding.accelerate_fsdp(plan.strategy == "fsdp"):
        trainer = stage.build(cfg, model, tok, splits, training_kwargs(cfg, run, plan), [logger.callback()])
    if plan.strategy == "fsdp" and not trainer.is_fsdp_enabled:  # never train another strategy than the one asked
        raise AyarError(
            f"distributed.strategy fsdp: accelerate did not start FSDP for this {stage.name} run on {plan.device}; "
            "use distributed.strategy ddp or deepspeed"
        )
    if not plan.reads_weights:
        sharding.trainable_in_memory(trainer.model)
    trainable_in_fp32(trainer.model)  # these stages train adapters (method full is sft's alone)
    if plan.strategy == "fsdp" and plan.placement.dtype != torch.float32:
        sharding.outputs_in_fp32(trainer.model)
    compute_as_own_loop(trainer, plan.device)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for noisy in (PrinterCallback, ProgressCallback):  # our progress line replaces the raw log dicts
        trainer.remove_callback(noisy)
    rows = {"train_rows": len(splits.train), "val_rows": len(splits.val), "test_rows": len(splits.test)}
    r.record_start(tok, model_path, plan, *parameter_counts(trainer.model), rows)
    if r.resuming and world.main:
        say(f"resume {run.path}")
        run.truncate_metrics(_last_checkpoint_step(run))
    elif stage.before is not None and not r.resuming:
        trainer.add_callback(_at_train_begin(lambda: _measure_before(stage, cfg, trainer, splits, r)))

    # --- fit ------------------------------------------------------------------------------------------
    wall = time.perf_counter()
    with trl_head.narrow_tiles(plan.device):  # TRL's fused LM head (DPO, KTO, GRPO) in narrower tiles on a CPU
        output = trainer.train(resume_from_checkpoint=True if r.resuming else None)
    seconds = time.perf_counter() - wall
    if logger.stopped:
        r.finish_stopped(trainer.state.global_step, trainer.state.max_steps)
        distributed.stop(world)
        return run
    # a final evaluation, as SFT runs one (logged through the callback); `after` runs it with its measurement
    with trl_head.narrow_tiles(plan.device):
        after = stage.after(cfg, trainer, splits) if stage.after is not None else {}
        if stage.after is None and trainer.eval_dataset is not None:
            trainer.evaluate()

    # --- save -----------------------------------------------------------------------------------------
    # ZeRO-3 and FSDP hold a part of each weight: gathered whole (every rank takes part) for rank 0 to save
    whole = None
    if plan.strategy == "deepspeed" and cfg.distributed.zero_stage == 3:
        whole = zero.trained_state(trainer.model)
    elif plan.strategy == "fsdp":
        whole = sharding.trained_state(trainer.model)
    peaks = peaks_per_rank(world)
    if not world.main:
        distributed.stop(world)
        return run
    r.save(trainer.model, tok, state_dict=whole)
    meta = r.finish(
        _readme,
        steps=trainer.state.global_step,
        total_steps=trainer.state.max_steps,
        train_seconds=round(seconds, 2),
        after=after,
        fallback_loss=output.training_loss,
        **peaks,
    )
    summary = ", ".join(f"{k} {_fmt(meta.get('before', {}).get(k))} -> {_fmt(v)}" for k, v in after.items())
    say(
        f"done   {meta['steps']} steps in {seconds:.0f}s, final loss {_fmt(meta['final_loss'])}"
        + (f"; {summary}" if summary else "")
    )
    say(f"run    {run.path}")
    distributed.stop(world)
    return run


def check_kinds(splits: Splits, stage: Stage) -> None:
    """Every row must be of a kind the stage trains on: say which row is not, and what the stage needs."""
    for rec in splits.train + splits.val:
        if rec.kind not in stage.kinds:
            need = {
                "preference": "preference pairs (prompt, chosen, rejected; data.format: preference or hh)",
                "chat": "conversations ending with an assistant answer (or prompts)",
                "classification": "labelled texts (text, label; data.format: classification)",
            }
            raise DataError(
                f"{rec.where}: a {rec.kind} row, but `stage: {stage.name}` trains on "
                f"{' or '.join(need[k] for k in stage.kinds)}"
            )


def _say_drops(cfg: TrainConfig, tok, splits: Splits, say) -> None:
    """Rows the stage's trainer would leave out (training/trainer_plan.py `trainer_drops`), said before it does; none
    left to train on: an error."""
    from ayar.training.trainer_plan import trainer_drops

    for name, records in (("train", splits.train), ("validation", splits.val)):
        drops = trainer_drops(cfg, tok, records)
        if not drops:
            continue
        first, why = drops[0]
        message = (
            f"{len(drops)} of {len(records)} {name} rows left out by the {cfg.stage} trainer, e.g. {first.where}: "
            f"{why}; raise data.max_length or shorten those rows"
        )
        if name == "train" and len(drops) == len(records):
            raise DataError(message.replace("rows left out", "rows (all of them) left out"))
        say(f"warning: {message}")


def _lint(cfg: TrainConfig, splits: Splits, say) -> None:
    """The record-level data lint SFT runs (empty fields, duplicates, leakage between splits)."""
    if cfg.data.lint == "off":
        return
    from ayar.data.lint import lint

    enforce_lint(lint(splits.as_dict()), cfg.data.lint, say)


def compute_as_own_loop(trainer, device: str) -> None:
    """A Trainer stage computes its adapters as ayar's own loop does: over a bf16/fp16 base, under autocast on the
    input as it is (training/loss.py `compute_context`), where peft would copy each adapter's input to fp32 (and
    autocast back to bf16 for the matmul: a copy kept per adapter for backward, the same numbers); on a CPU, peft's
    dropouts swapped for ayar's, which keeps no mask (torch's CPU dropout keeps a noise tensor as large as its
    input). The same under every strategy (under FSDP and ZeRO-3 DPO measured the same either way: no input copies
    there; GRPO's dropout noise was kept). Measured in benchmarks/README.md."""
    from ayar.kernels.dropout import use_fast_dropout
    from ayar.training.loss import compute_context

    if device == "cpu":
        use_fast_dropout(trainer.model)
    stack = trainer.compute_loss_context_manager

    def context():
        contexts = stack()
        contexts.enter_context(compute_context(trainer.model))
        return contexts

    trainer.compute_loss_context_manager = context


def training_kwargs(cfg: TrainConfig, run: RunDir, plan) -> dict:
    """Our TrainingConfig as transformers TrainingArguments fields (shared by every Trainer-based stage); the
    optimizer's part comes from training/optim.py, as our own loop's does."""
    t = cfg.training
    has_val = cfg.data.validation or cfg.data.val_ratio > 0
    # as the plan decided (`training.gradient_checkpointing`, or auto: on when the run would not fit without it)
    checkpointing = plan.layout.checkpointing if plan.layout is not None else bool(t.gradient_checkpointing)
    return dict(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        logging_steps=t.logging_steps,
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        eval_strategy="steps" if t.eval_steps and has_val else "no",
        eval_steps=t.eval_steps or None,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        use_cpu=plan.device == "cpu",
        bf16=plan.placement.dtype == torch.bfloat16,
        fp16=plan.placement.dtype == torch.float16,
        # off unless the plan turns it on (TRL's configs would turn it on by default); non-reentrant, as ayar's own
        # loop (TRL's DPO switches to reentrant under ZeRO-3 with peft, which DeepSpeed needs)
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # several processes: every adapter weight takes part in each step
        ddp_timeout=cfg.distributed.timeout,  # the group is ayar's (distributed.start), made with it already
        **trainer_optimizer_args(t),
        **({"deepspeed": zero.deepspeed_config(t, cfg.distributed, plan)} if plan.strategy == "deepspeed" else {}),
        **(sharding.trainer_args(cfg.distributed, plan.rank0_loading) if plan.strategy == "fsdp" else {}),
    )


def _measure_before(stage: Stage, cfg: TrainConfig, trainer, splits: Splits, r: Recipe) -> None:
    """The stage's held-out measurement before training, on every rank (it evaluates through the Trainer), kept
    by rank 0. Taken as training starts: accelerate's FSDP2 splits the model together with its optimizer, in
    train() (it refuses the model alone), and one moment for every strategy keeps their runs comparable."""
    before = stage.before(cfg, trainer, splits)
    if r.world.main:
        r.run.update_meta(before=before)


def _at_train_begin(action):
    """A Trainer callback running `action` once training has prepared the model, before the first step."""
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            action()

    return Callback()


# the stage metric shown beside the loss in the progress line, when the stage logs it
_HEADLINE = ("preference_accuracy", "reward_margin", "mean_reward", "accuracy", "f1_macro")


class _MetricsLog:
    """Trainer logs -> metrics.jsonl (our key names), the tracker and the progress line."""

    def __init__(self, recipe: Recipe, renames: dict):
        self.recipe, self.renames, self.console = recipe, renames, recipe.console
        self.progress, self.started, self.first_step = None, 0.0, 0
        self.stopped = False  # on request (RUN/STOP): the Trainer saved a checkpoint and ended

    def callback(self):
        from transformers import TrainerCallback

        log = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                from ayar.training.progress import TrainProgress

                log.progress = TrainProgress(state.max_steps, state.global_step, log.console).__enter__()
                log.started, log.first_step = time.perf_counter(), state.global_step
                if log.recipe.world.main:
                    log.recipe.run.update_meta(total_steps=state.max_steps)

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step < state.max_steps and log.recipe.stop_requested():
                    log.stopped = control.should_save = control.should_training_stop = True

            def on_log(self, args, state, control, logs=None, **kwargs):
                log.write(state.global_step, logs or {})

            def on_train_end(self, args, state, control, **kwargs):
                if log.progress is not None:
                    log.progress.__exit__(None, None, None)
                    log.progress = None

        return Callback()

    def write(self, step: int, logs: dict) -> None:
        record = {"step": step}
        for key, value in logs.items():
            if not isinstance(value, (int, float)) or key in ("total_flos", "epoch_time"):
                continue
            name = self.renames.get(key, key)
            record[{"learning_rate": "lr", "train_loss": "mean_train_loss"}.get(name, name)] = float(value)
        if len(record) > 1:
            self.recipe.log(record)
        if self.progress is not None and "loss" in record:
            seconds = max(time.perf_counter() - self.started, 1e-9)
            done = max(step - self.first_step, 1)
            rate = record.get("num_tokens", 0.0) / seconds if "num_tokens" in record and not self.first_step else 0.0
            extra = "  ".join(f"{k.replace('_', ' ')} {record[k]:.3f}" for k in _HEADLINE if k in record)
            self.progress.update(
                step, record["loss"], record.get("lr", 0.0), rate, (self.progress.total - step) * seconds / done, extra
            )


def _last_checkpoint_step(run: RunDir) -> int:
    steps = [
        int(p.name.rsplit("-", 1)[-1])
        for p in run.checkpoints.glob("checkpoint-*")
        if p.name.rsplit("-", 1)[-1].isdigit()
    ]
    return max(steps, default=0)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _readme(run: RunDir, cfg: TrainConfig, meta: dict) -> str:
    rows = "".join(
        f"| {k} | {_fmt(meta.get('before', {}).get(k))} | {_fmt(v)} |\n" for k, v in meta.get("after", {}).items()
    )
    results = f"\n| held-out metric | before | after |\n|---|---|---|\n{rows}" if rows else ""
    start = f" (starting from {cfg.model.name})" if meta.get("merged_adapters") else ""
    use = {
        "reward": "Score texts with it: `AutoModelForSequenceClassification` + this adapter (higher = preferred).",
        "classification": "Classify texts with it: `AutoModelForSequenceClassification` + this adapter; labels in "
        "run.json.",
    }
    how = use.get(
        "classification" if cfg.task == "classification" else cfg.stage,
        f"    ayar chat {run.path}\n    ayar eval {run.path}",
    )
    return f"""# {run.path.name}

`stage: {cfg.stage}`{f" ({cfg.preference.loss})" if cfg.stage == "dpo" else ""}, `task: {cfg.task}`,
{cfg.method} adapter on `{meta["base_model"]}`{start}, made by ayar {meta["ayar_version"]} on {meta["created"]}:
{meta["steps"]} steps, {meta["train_seconds"]} s, final loss {_fmt(meta["final_loss"])}.
{results}
Files: `config.yaml`, `adapter/`, `tokenizer/`, `checkpoints/` (resumable: `ayar train --resume {run.path}`),
`metrics.jsonl`, `loss.png`.

{how}
{"" if cfg.task == "classification" or cfg.stage == "reward" else chr(10) + loading_snippets(run, cfg, meta)}"""
