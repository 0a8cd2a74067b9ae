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
from ayar.training import sharding
from ayar.training.distributed import World
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


@dataclass
class LoopResult:
    state: LoopState
    total_steps: int
    kept_best: bool = False  # early stopping: the best weights put back (an earlier step's than the last)
    root: object | None = None  # FSDP: the split model (training/sharding.py), which saves it


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


def total_steps_for(n_examples: int, tcfg, world_size: int = 1) -> int:
    """Optimizer steps of a run: max_steps, or epochs of global batches (batch_size x processes x grad_accum)."""
    if tcfg.max_steps > 0:
        return tcfg.max_steps
    per_epoch = math.ceil(math.ceil(n_examples / (tcfg.batch_size * world_size)) / tcfg.grad_accum)
    return max(1, math.ceil(per_epoch * tcfg.epochs))


@torch.no_grad()
def evaluate(
    model, examples: list[Example], batch_size: int, pad_id: int, device: str, autocast=None, root=None
) -> float | None:
    """Mean loss per trained token. `root`: the FSDP root unit (training/sharding.py) the loss runs through."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = _to(collate(examples[i : i + batch_size], pad_id), device)
        s, n = root(batch, autocast=autocast) if root is not None else loss_sum(model, batch, autocast=autocast)
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
    processes (`world`, training/distributed.py) each reads its slice of every global micro-batch; under FSDP
    (plan.strategy, training/sharding.py) the model is split across them first."""
    world = world or World()
    total = total_steps_for(len(train), tcfg, world.size)
    root = (
        sharding.shard(model, plan.distributed, plan.device, world.size, world.rank, plan.parts_from)
        if plan.strategy == "fsdp"
        else None
    )
    if root is None:
        dist.same_start(world, [p for p in model.parameters() if p.requires_grad])  # FSDP sends rank 0's itself
    optimizer = build_optimizer(model, tcfg, warn=warn)
    scheduler = build_scheduler(optimizer, tcfg, total)
    order = BatchOrder(len(train), tcfg.batch_size * world.size, tcfg.seed)
    mine = slice(world.rank * tcfg.batch_size, (world.rank + 1) * tcfg.batch_size)
    state = LoopState(world_size=world.size)
    best_adapter = None
    if resume_from is not None:
        shards = (lambda folder: sharding.load_shards(folder, root, optimizer)) if root is not None else None
        state = LoopState(
            **ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, world.rank, world.size, shards)
        )
        state = continue_with(state, tcfg.batch_size, world.size)
        state.stopped = False  # the checkpoint of a stopped run says it stopped; resuming goes on
        if tcfg.early_stopping_patience and root is None:  # FSDP's stays on disk (`_keep_best`)
            best_adapter = ckpt.load_best(ckpt_root, state.best_step)
    device, packed, fused, per_pass = plan.device, plan.layout.packed, plan.layout.fused, plan.layout.per_pass
    loss_fn = load_callable(tcfg.loss, "training.loss") if tcfg.loss else None
    model.train()
    while state.step < total and not state.stopped_early and not state.stopped:
        t0 = time.perf_counter()
        micro_batches = []
        for _ in range(tcfg.grad_accum):
            if state.micro >= order.per_epoch:
                state.epoch, state.micro = state.epoch + 1, 0
            examples = [train[i] for i in order.indices(state.epoch, state.micro)[mine]]
            micro_batches += [
                collate(group, pad_id, packed, share_prefix=fused) for group in length_groups(examples, per_pass)
            ]
            state.micro += 1
        # Mean over every trained token of the optimizer step, whatever the micro-batch split (and the processes).
        n_target = dist.total(world, sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches))
        step_loss = 0.0
        for i, b in enumerate(micro_batches):
            b = _to(b, device)
            with attention_through_backward(model, b):
                if root is not None:  # FSDP: gradients reduce-scattered in the step's last backward only
                    sharding.sync_gradients(root, i == len(micro_batches) - 1)
                    s, _ = root(b, loss_fn, fused, plan.autocast)
                else:
                    s, _ = loss_sum(model, b, loss_fn, fused, plan.autocast)
                (s / n_target).backward()
            step_loss += float(s.detach()) / n_target
        trained = [p for p in model.parameters() if p.requires_grad]
        if root is None:
            dist.sum_gradients(world, trained)  # once per optimizer step, after the accumulation micro-steps
        step_loss = dist.total(world, step_loss)
        if tcfg.max_grad_norm > 0:  # the norm before clipping, logged beside the loss either way
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, tcfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trained if p.grad is not None])
        grad_norm = float(sharding.whole(grad_norm))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        dt = time.perf_counter() - t0
        tokens = dist.total(world, sum(example_tokens(b) for b in micro_batches))
        state.real_tokens += tokens
        state.train_seconds += dt
        record = {
            "step": state.step,
            "epoch": round(state.epoch + state.micro / order.per_epoch, 4),
            "loss": step_loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_s": tokens / dt,
            "step_seconds": dt,
        }
        if world.main and (state.step % tcfg.logging_steps == 0 or state.step == total):
            on_log(record)
        if on_progress and world.main:
            on_progress(state, record)

        if val and ((tcfg.eval_steps and state.step % tcfg.eval_steps == 0) or state.step == total):
            # every rank evaluates the whole validation split: the same number everywhere, the same decisions
            eval_loss = evaluate(model, val, tcfg.batch_size, pad_id, device, plan.autocast, root)
            if world.main:
                on_log({"step": state.step, "eval_loss": eval_loss})
            state.last_eval, state.last_eval_step = eval_loss, state.step
            if state.best_eval is None or eval_loss < state.best_eval:
                state.best_eval, state.best_step, state.bad_evals = eval_loss, state.step, 0
                if tcfg.early_stopping_patience:
                    best_adapter = _keep_best(world, ckpt_root, state.step, model, root)
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
            _checkpoint(world, ckpt_root, state, model, optimizer, scheduler, tcfg.save_total_limit, root)
        for cb in callbacks:
            cb(state)
        state.stopped = bool(stop_requested and state.step < total and stop_requested())
    _checkpoint(world, ckpt_root, state, model, optimizer, scheduler, tcfg.save_total_limit, root)
    if fused:
        fused_decoder.release(model)
    kept_best = False
    if tcfg.early_stopping_patience and not state.stopped and state.best_step not in (None, state.step):
        best = ckpt.best_of(ckpt_root, state.best_step)
        if root is not None and best is not None and (best / ckpt.SHARDS).is_dir():
            sharding.load_shards(best, root)
            kept_best = True
        elif best_adapter is not None:
            ckpt.load_trained_state(model, best_adapter)
            kept_best = True
    return LoopResult(state, total, kept_best, root)


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


def _checkpoint(world: World, folder, state: LoopState, model, optimizer, scheduler, keep: int, root=None) -> None:
    """Rank 0 writes the checkpoint, with every rank's random state (each resumes its own dropout stream). FSDP
    (`root`): every rank writes its shards into the temp folder rank 0 makes, before rank 0 completes it."""
    rng = dist.gather(world, ckpt.rng_state()) if world.active else None

    def complete(shards=None) -> None:
        ckpt.save_checkpoint(folder, state.step, model, optimizer, scheduler, _state_dict(state), keep, rng, shards)

    if root is not None:
        dist.written_together(world, complete, lambda tmp: sharding.save_shards(tmp, root, optimizer))
        return
    if world.main:
        complete()
    dist.barrier(world)


def _keep_best(world: World, folder, step: int, model, root) -> dict | None:
    """The best weights so far, kept on disk for a resumed run: a copy in memory, saved by rank 0 (returned); under
    FSDP each rank writes its parts into the folder rank 0 makes, and nothing is held in memory or gathered."""
    if root is None:
        best = _adapter_copy(model)
        if world.main:
            ckpt.save_best(folder, step, best)
        return best
    dist.written_together(
        world, lambda each: ckpt.save_best(folder, step, shards=each), lambda tmp: sharding.save_shards(tmp, root)
    )
    return None


def _state_dict(state: LoopState) -> dict:
    return dict(state.__dict__)


def _adapter_copy(model) -> dict:
    return ckpt.trained_state(model)


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}
