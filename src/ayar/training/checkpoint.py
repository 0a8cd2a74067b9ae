"""Atomic, resumable checkpoints.

A checkpoint is written into a hidden temp directory and renamed into place only when complete, so
a kill at any moment leaves either a whole checkpoint or none: resume never picks a broken one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ayar.fsutil import atomic_directory

PREFIX = "checkpoint-"
SHARDS = "sharded"  # a checkpoint's sub-folder of torch.distributed.checkpoint files (FSDP, training/sharding.py)
ZERO = "zero"  # a checkpoint's sub-folder of DeepSpeed's own (ZeRO, training/zero.py)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    state: dict,
    keep: int,
    rng: list | None = None,
    shards: Callable[[Path], None] | None = None,
) -> Path:
    """`rng`: every process's random state (training/distributed.py gathers them), so each resumes its own.
    `shards(folder)`: writes the trained weights and optimizer states split across processes (FSDP, DeepSpeed:
    training/distributed.py `Parallel.write_split`) instead of whole ones."""
    final = ckpt_root / f"{PREFIX}{step:07d}"
    with atomic_directory(final, fsync=True) as tmp:  # fsync: data on disk before the rename makes it visible
        if shards is not None:
            shards(tmp)
        else:
            save_file(trained_state(model), tmp / "adapter.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"ranks": rng} if rng else rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state))
    _prune(ckpt_root, keep)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint; temp directories of interrupted saves are ignored."""
    if not ckpt_root.is_dir():
        return None
    done = sorted(
        p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()
    )
    return done[-1] if done else None


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX))


def load_checkpoint(
    path: Path,
    model,
    optimizer,
    scheduler,
    rank: int = 0,
    world_size: int = 1,
    shards: Callable | None = None,
    split: str | None = None,
) -> dict:
    """`shards(folder)`: reads a checkpoint split across processes into the sub-folder `split` (FSDP: SHARDS,
    DeepSpeed: ZERO); one written whole cannot be read split, nor the reverse, nor one engine's by the other."""
    written = next((kind for kind in (SHARDS, ZERO) if (path / kind).is_dir()), None)
    if written != split:
        from ayar.errors import AyarError

        n = world_size_of(path)
        how = {
            SHARDS: f"distributed.strategy fsdp in several processes (--nproc {n})",
            ZERO: f"distributed.strategy deepspeed (the same zero_stage) in several processes (--nproc {n})",
            None: "distributed.strategy ddp, or in one process",
        }
        what = {SHARDS: "split across processes by FSDP", ZERO: "by DeepSpeed ZeRO", None: "whole"}
        by = f" in {n} processes" if n > 1 else ""
        raise AyarError(f"{path} was written {what[written]}{by}: resume it with {how[written]}")
    if shards is not None:
        shards(path)
    else:
        load_trained_state(model, load_file(path / "adapter.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    if "ranks" in rng:  # each process its own state; with another number of processes, rank 0's for all
        rng = rng["ranks"][rank] if len(rng["ranks"]) == world_size else rng["ranks"][0]
    _set_rng_state(rng)
    return json.loads((path / "state.json").read_text())


def world_size_of(path: Path) -> int:
    """How many processes wrote a checkpoint."""
    return json.loads((path / "state.json").read_text()).get("world_size", 1)


def trained_state(model) -> dict:
    """What training changes, copied to CPU: the adapter weights, or every trainable weight of a full fine-tune."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
    else:
        state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}


def load_trained_state(model, state: dict) -> None:
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
    else:
        missing = set(state) - {n for n, _ in model.named_parameters()}
        if missing:
            raise ValueError(f"checkpoint weights not in the model: {sorted(missing)[:5]}")
        model.load_state_dict(state, strict=False)


BEST = "best"  # the best adapter so far (early stopping), beside the checkpoints: a resumed run keeps it


def save_best(ckpt_root: Path, step: int, state: dict | None = None, shards: Callable[[Path], None] | None = None):
    """The best adapter (or model) so far: `state` whole, or `shards(folder)` writing it split (FSDP)."""
    with atomic_directory(ckpt_root / BEST, fsync=True) as tmp:
        if shards is not None:
            shards(tmp)
        else:
            save_file(state, tmp / "adapter.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step}))


def best_of(ckpt_root: Path, step: int | None) -> Path | None:
    """The folder of the saved best, if it is the one of `step` (the best step a resumed checkpoint recorded)."""
    folder = ckpt_root / BEST
    if step is None or not (folder / "state.json").is_file():
        return None
    return folder if json.loads((folder / "state.json").read_text()).get("step") == step else None


def load_best(ckpt_root: Path, step: int | None) -> dict | None:
    """The saved best adapter (written whole), if it is the one of `step`."""
    folder = best_of(ckpt_root, step)
    return load_file(folder / "adapter.safetensors") if folder and (folder / "adapter.safetensors").is_file() else None


def remove_stale_temp(ckpt_root: Path) -> None:
    """What interrupted saves left: temp folders, and earlier folders set aside to be deleted."""
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def _prune(ckpt_root: Path, keep: int) -> None:
    done = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))
    for p in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    # Training draws randomness only from torch (dropout); the data order is derived from the seed.
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
