"""The training loop shared by the runners: data order, accumulation, eval, early stopping, checkpoints.

Our own loop rather than HF Trainer: it computes the loss on trained positions only (see loss.py),
packs padding-free, and owns the data cursor, so a resumed run continues with exactly the batches,
optimizer, scheduler and RNG state the uninterrupted run would have had.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ayar.data.collate import collate
from ayar.data.render import IGNORE, Example
from ayar.errors import AyarError
from ayar.kernels import base_model, fused_decoder, varlen
from ayar.plugins import load_callable
from ayar.training import checkpoint as ckpt
from ayar.training import distributed as dist
from ayar.training.distributed import Parallel, Replicas, World
from ayar.training.loss import loss_sum
from ayar.training.optim import build_optimizer, build_scheduler


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    micro: int = 0  # next micro-batch index within the epoch
    best_eval: float | None = None
    last_eval: float | None = None  # the latest eval loss (hyperparameter search reports it for pruning)
    last_eval_step: int | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    stopped: bool = False  # on request (RUN/STOP): checkpointed, to be resumed
    real_tokens: int = 0
    train_seconds: float = 0.0
    world_size: int = 1  # the processes `micro` was counted with (a global micro-batch is batch_size x this)
    loss_scale: dict | None = None  # fp16 compute: the GradScaler's state (its scale and growth count)


@dataclass
class LoopResult:
    state: LoopState
    total_steps: int
    kept_best: bool = False  # early stopping: the best weights put back (an earlier step's than the last)
    parallel: Parallel | None = None  # how the processes hold the model (split: FSDP, ZeRO-3), which saves it


class BatchOrder:
    """Deterministic micro-batches: epoch e uses a permutation seeded by (seed, e)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.bs, self.seed = n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)
        self._cache: tuple[int, list[int]] | None = None

    def indices(self, epoch: int, micro: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._cache = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._cache[1][micro * self.bs : (micro + 1) * self.bs]


def attention_through_backward(model, batch: dict):
    """Per-example attention (kernels/varlen.py) routed for a pass's forward and its backward: gradient checkpointing
    recomputes each layer's forward during backward, after the forward has returned, and the
    recomputation must take the same attention (whole-row causal attention there would mix examples)."""
    base = base_model(model)
    return varlen.varlen_attention(base) if varlen.routes(base.config, batch) else contextlib.nullcontext()


def enable_checkpointing(model) -> None:
    """Gradient checkpointing: each decoder layer keeps only its input and recomputes its forward in
    backward (non-reentrant, RNG state preserved: the same dropout masks). The fused decoder follows the
    layers' flag too."""
    base = base_model(model)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def length_groups(examples: list[Example], rows_per_pass: int) -> list[list[Example]]:
    """Split a micro-batch into forward/backward passes of `rows_per_pass` rows of similar length (0: one
    pass). The step's gradient is the same (the loss is normalized over the whole step); what changes is
    padding (each pass pads to its own longest row) and peak memory (one pass's activations at a time)."""
    if rows_per_pass <= 0 or rows_per_pass >= len(examples):
        return [examples]
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    return [ordered[i : i + rows_per_pass] for i in range(0, len(ordered), rows_per_pass)]


def passes_of(
    train: list[Example], chosen: list[int], world: World, batch_size: int, per_pass: int, lockstep: bool, make
) -> list[tuple[dict, bool]]:
    """This process's passes of one global micro-batch (`chosen`: its rows, in order): its slice of the rows, in
    passes of `per_pass` rows (`length_groups`), made into batches by `make`; each with whether it trains. Where a
    pass is collective (`lockstep`: FSDP and ZeRO gather weights or exchange gradients inside forward and backward),
    every process must run as many: one with fewer rows (the last micro-batch of an epoch, when the rows do not
    divide evenly: some processes may get none) adds stand-in passes of a real row whose loss counts zero, so its
    collectives meet the others' and it adds nothing to the gradients."""
    slices = [chosen[r * batch_size : (r + 1) * batch_size] for r in range(world.size)]
    mine = [train[i] for i in slices[world.rank]]
    passes = [(make(group), True) for group in length_groups(mine, per_pass)] if mine else []
    if lockstep:
        most = max(len(length_groups([train[i] for i in rows], per_pass)) if rows else 0 for rows in slices)
        passes += [(make([train[chosen[0]]]), False) for _ in range(most - len(passes))]
    return passes


def total_steps_for(n_examples: int, tcfg, world_size: int = 1) -> int:
    """Optimizer steps of a run: max_steps, or epochs of global batches (batch_size x processes x grad_accum)."""
    if tcfg.max_steps > 0:
        return tcfg.max_steps
    per_epoch = math.ceil(math.ceil(n_examples / (tcfg.batch_size * world_size)) / tcfg.grad_accum)
    return max(1, math.ceil(per_epoch * tcfg.epochs))


@torch.no_grad()
def evaluate(
    model, examples: list[Example], batch_size: int, pad_id: int, device: str, autocast=None, parallel=None
) -> float | None:
    """Mean loss per trained token. `parallel`: how the processes hold the model (the loss runs through it)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = _to(collate(examples[i : i + batch_size], pad_id), device)
        s, n = parallel.evaluate(batch, autocast) if parallel is not None else loss_sum(model, batch, autocast=autocast)
        total, count = total + float(s), count + n
    model.train(was_training)
    return total / max(count, 1)


def run_loop(
    model,
    train: list[Example],
    val: list[Example],
    tcfg,
    *,
    plan,
    pad_id: int,
    ckpt_root,
    on_log: Callable[[dict], None],
    on_progress: Callable[[LoopState, dict], None] | None = None,
    resume_from=None,
    callbacks: list[Callable[[LoopState], None]] = (),
    warn=print,
    world: World | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> LoopResult:
    """Train `model` on `train` as `plan` (training/plan.py: RunPlan with its layout) says; with several
    processes (`world`, training/distributed.py) each reads its slice of every global micro-batch, and the model is
    held as plan.strategy says (`parallel_for`: whole in each, or split by FSDP or DeepSpeed ZeRO)."""
    world = world or World()
    total = total_steps_for(len(train), tcfg, world.size)
    parallel = parallel_for(plan, model, tcfg, world)
    optimizer = build_optimizer(model, tcfg, warn=warn, cpu_adam=plan.cpu_adam)
    parallel.prepare(optimizer)
    # after: DeepSpeed drops the optimizer's empty parameter groups (LoRA+'s embedding group, where none is trained),
    # and a schedule made before would step one learning rate per group it no longer has
    scheduler = build_scheduler(optimizer, tcfg, total)
    order = BatchOrder(len(train), tcfg.batch_size * world.size, tcfg.seed)
    state = LoopState(world_size=world.size)
    best_adapter = None
    if resume_from is not None:
        shards = (lambda folder: parallel.read_split(folder, optimizer)) if parallel.split else None
        state = LoopState(
            **ckpt.load_checkpoint(
                resume_from, model, optimizer, scheduler, world.rank, world.size, shards, parallel.split
            )
        )
        state = continue_with(state, tcfg.batch_size, world.size)
        state.stopped = False  # the checkpoint of a stopped run says it stopped; resuming goes on
        if state.loss_scale and parallel.scaler is not None:
            parallel.scaler.load_state_dict(state.loss_scale)
        if tcfg.early_stopping_patience and parallel.best_whole:  # else it stays on disk by parts (`_keep_best`)
            best_adapter = ckpt.load_best(ckpt_root, state.best_step)
    device, packed, fused, per_pass = plan.device, plan.layout.packed, plan.layout.fused, plan.layout.per_pass
    loss_fn = load_callable(tcfg.loss, "training.loss") if tcfg.loss else None
    make = lambda rows: collate(rows, pad_id, packed, share_prefix=fused)  # noqa: E731
    model.train()
    while state.step < total and not state.stopped_early and not state.stopped:
        t0 = time.perf_counter()
        passes = []  # (batch, whether it trains: a stand-in pass does not, see `passes_of`)
        for _ in range(tcfg.grad_accum):
            if state.micro >= order.per_epoch:
                state.epoch, state.micro = state.epoch + 1, 0
            chosen = order.indices(state.epoch, state.micro)
            passes += passes_of(train, chosen, world, tcfg.batch_size, per_pass, parallel.lockstep, make)
            state.micro += 1
        micro_batches = [b for b, trains in passes if trains]
        # Mean over every trained token of the optimizer step, whatever the micro-batch split (and the processes).
        n_target = dist.total(world, sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches))
        step_loss = 0.0
        for i, (b, trains) in enumerate(passes):
            b = _to(b, device)
            with attention_through_backward(model, b):  # gradients exchanged in the step's last backward
                s, _ = parallel.forward(b, loss_fn, fused, plan.autocast, last=i == len(passes) - 1)
                parallel.backward(s / n_target if trains else s * 0.0)
            step_loss += float(s.detach()) / n_target if trains else 0.0
        step_loss = dist.total(world, step_loss)
        lr = scheduler.get_last_lr()[0]
        grad_norm = parallel.step(optimizer, tcfg.max_grad_norm)  # the norm before clipping, logged either way
        scheduler.step()
        if parallel.scaler is not None:
            state.loss_scale = parallel.scaler.state_dict()
        state.step += 1
        dt = time.perf_counter() - t0
        tokens = dist.total(world, sum(example_tokens(b) for b in micro_batches))
        state.real_tokens += tokens
        state.train_seconds += dt
        record = {
            "step": state.step,
            "epoch": round(state.epoch + state.micro / order.per_epoch, 4),
            "loss": step_loss,
            "grad_norm": grad_norm if math.isfinite(grad_norm) else None,  # fp16: an overflow, the step skipped
            "lr": lr,
            "tokens_per_s": tokens / dt,
            "step_seconds": dt,
        }
        if parallel.scaler is not None:
            record["loss_scale"] = parallel.scaler.get_scale()
        if world.main and (state.step % tcfg.logging_steps == 0 or state.step == total):
            on_log(record)
        if on_progress and world.main:
            on_progress(state, record)

        if val and ((tcfg.eval_steps and state.step % tcfg.eval_steps == 0) or state.step == total):
            # every rank evaluates the whole validation split: the same number everywhere, the same decisions
            eval_loss = evaluate(model, val, tcfg.batch_size, pad_id, device, plan.autocast, parallel)
            if world.main:
                on_log({"step": state.step, "eval_loss": eval_loss})
            state.last_eval, state.last_eval_step = eval_loss, state.step
            if state.best_eval is None or eval_loss < state.best_eval:
                state.best_eval, state.best_step, state.bad_evals = eval_loss, state.step, 0
                if tcfg.early_stopping_patience:
                    best_adapter = _keep_best(world, ckpt_root, state.step, parallel)
            else:
                state.bad_evals += 1
                if tcfg.early_stopping_patience and state.bad_evals >= tcfg.early_stopping_patience:
                    state.stopped_early = True
                    warn(
                        f"early stopping at step {state.step}: eval loss has not improved for {state.bad_evals} "
                        "evaluations "
                        f"(best {state.best_eval:.4f} at step {state.best_step})"
                    )

        if tcfg.save_steps and state.step % tcfg.save_steps == 0 and state.step < total:
            _checkpoint(world, ckpt_root, state, parallel, optimizer, scheduler, tcfg.save_total_limit)
        for cb in callbacks:
            cb(state)
        state.stopped = bool(stop_requested and state.step < total and stop_requested())
    _checkpoint(world, ckpt_root, state, parallel, optimizer, scheduler, tcfg.save_total_limit)
    if fused:
        fused_decoder.release(model)
    kept_best = False
    if tcfg.early_stopping_patience and not state.stopped and state.best_step not in (None, state.step):
        best = ckpt.best_of(ckpt_root, state.best_step)
        if not parallel.best_whole and best is not None and (best / parallel.split).is_dir():
            parallel.read_split(best)
            kept_best = True
        elif best_adapter is not None:
            parallel.load_trained(best_adapter)
            kept_best = True
    return LoopResult(state, total, kept_best, parallel)


def parallel_for(plan, model, tcfg, world: World) -> Parallel:
    """How the processes hold and train the model, as the plan's strategy says (training/distributed.py)."""
    if plan.strategy == "fsdp":
        from ayar.training.sharding import Fsdp

        return Fsdp(model, plan, world)
    if plan.strategy == "deepspeed":
        from ayar.training.zero import Zero

        return Zero(model, tcfg, plan, world)
    return Replicas(model, world, plan.loss_scaling, plan.device)


def continue_with(state: LoopState, batch_size: int, world_size: int) -> LoopState:
    """A checkpoint's position in its epoch, for a resume with another number of processes: the same examples
    are done, now counted in global micro-batches of batch_size x world_size (the epoch's order is the same)."""
    if state.world_size == world_size:
        return state
    done = state.micro * batch_size * state.world_size
    per_micro = batch_size * world_size
    if done % per_micro:
        raise AyarError(
            f"this run's checkpoint is {done} examples into epoch {state.epoch}, which {world_size} processes of "
            f"{batch_size} rows (global micro-batches of {per_micro}) cannot continue from exactly; resume with "
            f"{state.world_size} processes, or a number whose global micro-batch divides {done}"
        )
    state.micro, state.world_size = done // per_micro, world_size
    return state


def example_tokens(batch: dict) -> int:
    """The examples' real tokens in a batch (not padding; a shared prefix counts once per example)."""
    if "example_tokens" in batch:
        return int(batch["example_tokens"])
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def _checkpoint(world: World, folder, state: LoopState, parallel: Parallel, optimizer, scheduler, keep: int) -> None:
    """Rank 0 writes the checkpoint, with every rank's random state (each resumes its own). Split models (FSDP,
    DeepSpeed): every rank writes its part into the temp folder rank 0 makes, before rank 0 completes it."""
    rng = dist.gather(world, ckpt.rng_state()) if world.active else None

    def complete(shards=None) -> None:
        ckpt.save_checkpoint(
            folder, state.step, parallel.model, optimizer, scheduler, _state_dict(state), keep, rng, shards
        )

    if parallel.split:
        dist.written_together(world, complete, lambda tmp: parallel.write_split(tmp, optimizer))
        return
    if world.main:
        complete()
    dist.barrier(world)


def _keep_best(world: World, folder, step: int, parallel: Parallel) -> dict | None:
    """The best weights so far, kept on disk for a resumed run: a copy in memory, saved by rank 0 (returned); where
    the processes keep them split (FSDP) each rank writes its parts into the folder rank 0 makes, and nothing is
    held in memory or gathered."""
    if parallel.best_whole:
        best = parallel.trained_copy()
        if world.main:
            ckpt.save_best(folder, step, best)
        return best
    dist.written_together(world, lambda each: ckpt.save_best(folder, step, shards=each), parallel.write_split)
    return None


def _state_dict(state: LoopState) -> dict:
    return dict(state.__dict__)


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}
