"""Data-parallel training for ayar's own loop on torch.distributed, in processes started by the field's
launchers: `torchrun -m ayar train ...`, `accelerate launch --multi_gpu -m ayar train ...` (it runs
torchrun; on CPU too), or `ayar train --nproc N` (which runs torchrun). Backend: nccl on CUDA, gloo on CPU.

Each rank reads its own slice of every global micro-batch (training/loop.py BatchOrder), so the global batch is
`batch_size` x processes x `grad_accum`. The loss of a step is the mean over every trained token of the global
batch: ranks add their trained-token counts first, each divides its sum by that total, and the adapter's
gradients are summed across ranks once per optimizer step, after the accumulation micro-steps (no sync on
those). That is the gradient one process gets from the whole batch, so N processes train the same model as one
(tested on gloo). Why not DDP's wrapper: its reducer needs the loss to come out of the wrapped module's
forward, and the fused CPU path computes the loss outside it. The gradients are all-reduced in buckets of up to
25 MB, as DDP's reducer does (`sum_gradients`); a LoRA adapter's fit in one.

Only rank 0 writes the run directory, logs, trackers and checkpoints; the others wait at a barrier.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def start(plan) -> World:
    """The process group for a plan made under a launcher (plan.world_size > 1); nothing in a plain process."""
    world = World(plan.world_size, plan.rank, int(os.environ.get("LOCAL_RANK", "0")))
    if not world.active:
        return world
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if plan.device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend=backend)
    return world


def stop(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def total(world: World, value: float) -> float:
    """`value` summed over the ranks."""
    if not world.active:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def same_start(world: World, params: list) -> None:
    """Rank 0's values of `params` on every rank (collective), as DDP's wrapper does when it wraps a model: the
    replicas then start equal even if something before the adapter's initialization drew other random numbers
    on one rank than on another (summed gradients applied to unequal weights would train N different models)."""
    if not world.active:
        return
    import torch.distributed as dist

    for p in params:
        dist.broadcast(p.data, src=0)


BUCKET_BYTES = 25 * 2**20  # gradients all-reduced together, at most (DDP's default bucket_cap_mb)


def sum_gradients(world: World, params: list, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Each trained parameter's gradient summed across ranks, once per optimizer step: consecutive gradients
    in buckets of up to `bucket_bytes` (one all-reduce each, few collectives for an adapter's many small
    tensors), so the extra memory is one bucket, not a second copy of every gradient (a full fine-tune)."""
    if not world.active:
        return
    import torch

    bucket, size = [], 0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        n = p.grad.numel() * 4
        if bucket and size + n > bucket_bytes:
            _sum_bucket(bucket)
            bucket, size = [], 0
        bucket.append(p)  # a gradient larger than a bucket gets one to itself, summed in place
        size += n
    if bucket:
        _sum_bucket(bucket)


def _sum_bucket(params: list) -> None:
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in params]
    if len(grads) == 1 and grads[0].dtype == torch.float32 and grads[0].is_contiguous():
        dist.all_reduce(grads[0])  # in place: no copy
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def share(world: World, value):
    """Rank 0's `value` (any picklable object) on every rank."""
    if not world.active:
        return value
    import torch.distributed as dist

    box = [value if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World, value) -> list:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if not world.active:
        return [value]
    import torch.distributed as dist

    out = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def written_together(world: World, complete: Callable, write: Callable[[Path], None]) -> None:
    """A folder every process writes its part into (`write(folder)`, collective), which rank 0 makes and completes:
    `complete(each)` calls `each(tmp)` on its temp folder, inside its atomic save (fsutil.atomic_directory); the
    others write into that folder; all return once rank 0 has completed it."""

    def each(tmp) -> None:
        write(Path(share(world, str(tmp) if tmp is not None else None)))

    if world.main:
        complete(each)
    else:
        each(None)
    barrier(world)


def barrier(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_first(world: World):
    """Rank 0 runs the block first (e.g. converting the default model, tokenizing into the shared cache), then the
    others. Where it fails (bad data), rank 0 says why and the others end quietly (SaidElsewhere) instead of
    waiting at the barrier or repeating the message."""
    if not world.active:
        yield
        return
    if not world.main:
        if not share(world, None):
            from ayar.errors import SaidElsewhere

            raise SaidElsewhere("rank 0 stopped the run")
        yield
        return
    try:
        yield
    except BaseException:
        share(world, False)
        raise
    share(world, True)
