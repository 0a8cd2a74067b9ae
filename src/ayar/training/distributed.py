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

How the processes hold and train the model is one object with one interface (`Parallel`), made by the loop from
the plan: `Replicas` here (one process, or data parallel: each holds the whole model), `Fsdp` (FSDP,
training/sharding.py) and `Zero` (DeepSpeed ZeRO, training/zero.py).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Protocol

# How long a process waits for rank 0 working alone (converting and loading the model, tokenizing the data into the
# shared cache, writing a checkpoint or the final model): hours on a large model or dataset, where a collective's
# timeout (distributed.timeout; NCCL's own default is 10 minutes) would end the run
RANK0_WAIT = timedelta(hours=24)


@dataclass
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0
    # gloo groups over the same processes (None: the default group), made by `start`: `cpu` for the CPU-side
    # collectives of training (summed loss counts, shared objects; under NCCL the default group takes CUDA tensors
    # alone), with the run's timeout; `patient` for waiting on rank 0 working alone (RANK0_WAIT)
    cpu: object = None
    patient: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


class Parallel(Protocol):
    """How the run's processes hold and train the model, for the loop (training/loop.py): passes, optimizer steps,
    checkpoints and the best weights early stopping keeps. `split`: the checkpoint sub-folder its split weights and
    optimizer states go to (training/checkpoint.py), None where a checkpoint holds them whole. `best_whole`: the best
    weights are kept as a whole copy (`trained_copy`), else written split (`write_split`). Every one reads a
    checkpoint back into another number of processes too. `lockstep`: forward and backward are collective (every
    process must run as many passes: training/loop.py `passes_of`)."""

    model: object
    split: str | None
    best_whole: bool
    lockstep: bool
    scaler: object | None  # fp16 compute: torch's GradScaler (plan.loss_scaling)

    def prepare(self, optimizer) -> None:
        """Called once the optimizer is made on the model's (possibly split) trained weights."""

    def forward(self, batch: dict, loss_fn=None, fused: bool = False, autocast=None, last: bool = True):
        """(summed loss, trained positions) of a micro-batch; `last`: the optimizer step's last micro-batch, whose
        backward is the one that exchanges gradients between processes."""

    def backward(self, loss) -> None: ...

    def step(self, optimizer, max_grad_norm: float) -> float:
        """The optimizer step (gradients exchanged, clipped to `max_grad_norm` when > 0); the norm before clipping."""

    def evaluate(self, batch: dict, autocast=None):
        """(summed loss, trained positions) without gradients."""

    def write_split(self, folder: Path, optimizer=None) -> None:
        """Each process writes its part of the trained weights (and optimizer states) into `folder` (collective)."""

    def read_split(self, folder: Path, optimizer=None) -> None: ...

    def trained_copy(self) -> dict:
        """The trained weights whole on every process (collective), as checkpoint.trained_state names them."""

    def load_trained(self, state: dict) -> None: ...

    def whole_state(self) -> dict | None:
        """For the final save (collective): the trained weights gathered whole on rank 0 under the model's
        state_dict names, or None where the model holds them whole already."""


class Replicas:
    """One process, or data parallel: every process holds the whole model and sums the trained weights' gradients
    with the others once per optimizer step (`sum_gradients`)."""

    split = None
    best_whole = True
    lockstep = False

    def __init__(self, model, world: World, loss_scaling: bool = False, device: str = "cpu"):
        self.model, self.world = model, world
        self.trained = [p for p in model.parameters() if p.requires_grad]
        self.scaler = self.make_scaler(device) if loss_scaling else None
        same_start(world, self.trained)

    def make_scaler(self, device: str):
        """Every process holds whole gradients, the same after they are summed: each finds the same overflow."""
        import torch

        return torch.amp.GradScaler(device.split(":")[0])

    def prepare(self, optimizer) -> None:
        pass

    def forward(self, batch: dict, loss_fn=None, fused: bool = False, autocast=None, last: bool = True):
        from ayar.training.loss import loss_sum

        return loss_sum(self.model, batch, loss_fn, fused, autocast)

    def backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer, max_grad_norm: float) -> float:
        import torch

        self.exchange_gradients()
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # the norm and clipping see the true gradients
        grads = [p.grad for p in self.trained if p.grad is not None]
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.trained, max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skipped where a gradient overflowed; the scale halves for the next step
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def exchange_gradients(self) -> None:
        sum_gradients(self.world, self.trained)

    def evaluate(self, batch: dict, autocast=None):
        return self.forward(batch, autocast=autocast)

    def write_split(self, folder: Path, optimizer=None) -> None:
        raise NotImplementedError("every process holds the whole model: checkpoints hold it whole")

    read_split = write_split

    def trained_copy(self) -> dict:
        from ayar.training.checkpoint import trained_state

        return trained_state(self.model)

    def load_trained(self, state: dict) -> None:
        from ayar.training.checkpoint import load_trained_state

        load_trained_state(self.model, state)

    def whole_state(self) -> dict | None:
        return None


def start(plan) -> World:
    """The process group for a plan made under a launcher (plan.world_size > 1), with the collectives' timeout of
    `distributed.timeout`, and ayar's two gloo groups (World); nothing in a plain process. A group made already (a
    script of the user's under a launcher) is kept as it is."""
    world = World(plan.world_size, plan.rank, int(os.environ.get("LOCAL_RANK", "0")))
    if not world.active:
        return world
    import torch
    import torch.distributed as dist

    timeout = timedelta(seconds=plan.distributed.timeout)
    if not dist.is_initialized():
        backend = "nccl" if plan.device.startswith("cuda") else "gloo"
        if backend == "nccl":  # its GPU on this machine, or the one it shows (a launcher gave each its own)
            torch.cuda.set_device(world.local_rank if torch.cuda.device_count() > 1 else 0)
        dist.init_process_group(backend=backend, timeout=timeout)
    world.cpu = dist.new_group(backend="gloo", timeout=timeout)
    world.patient = dist.new_group(backend="gloo", timeout=RANK0_WAIT)
    return world


def stop(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier(group=world.patient)  # rank 0 may still be writing the final model
            dist.destroy_process_group()


def total(world: World, value: float) -> float:
    """`value` summed over the ranks."""
    if not world.active:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, group=world.cpu)
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


def share(world: World, value, after_rank0_alone: bool = False):
    """Rank 0's `value` (any picklable object) on every rank; `after_rank0_alone`: the others wait for rank 0's
    work alone first, up to RANK0_WAIT."""
    if not world.active:
        return value
    import torch.distributed as dist

    box = [value if world.main else None]
    dist.broadcast_object_list(box, src=0, group=world.patient if after_rank0_alone else world.cpu)
    return box[0]


def gather(world: World, value) -> list:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if not world.active:
        return [value]
    import torch.distributed as dist

    out = [None] * world.size
    dist.all_gather_object(out, value, group=world.cpu)
    return out


def written_together(world: World, complete: Callable, write: Callable[[Path], None]) -> None:
    """A folder every process writes its part into (`write(folder)`, collective), which rank 0 makes and completes:
    `complete(each)` calls `each(tmp)` on its temp folder, inside its atomic save (fsutil.atomic_directory); the
    others write into that folder; all return once rank 0 has completed it."""

    def each(tmp) -> None:
        write(Path(share(world, str(tmp) if tmp is not None else None, after_rank0_alone=True)))

    if world.main:
        complete(each)
    else:
        each(None)
    barrier(world)


def barrier(world: World) -> None:
    """Every process here, after rank 0's work alone (a checkpoint written): waits up to RANK0_WAIT."""
    if world.active:
        import torch.distributed as dist

        dist.barrier(group=world.patient)


@contextlib.contextmanager
def main_first(world: World):
    """Rank 0 runs the block first (e.g. converting the default model, tokenizing into the shared cache), then the
    others. Where it fails (bad data), rank 0 says why and the others end quietly (SaidElsewhere) instead of
    waiting at the barrier or repeating the message."""
    if not world.active:
        yield
        return
    if not world.main:
        if not share(world, None, after_rank0_alone=True):
            from ayar.errors import SaidElsewhere

            raise SaidElsewhere("rank 0 stopped the run")
        yield
        return
    try:
        yield
    except BaseException:
        share(world, False, after_rank0_alone=True)
        raise
    share(world, True, after_rank0_alone=True)
