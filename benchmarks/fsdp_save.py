"""What saving a full fine-tune split by FSDP costs each process: by parts against gathered on rank 0.

The same 0.48B-parameter random Llama as benchmarks/fsdp_loading.py (1.9 GB in fp32, one file), read by parts and
split across N processes (FSDP2, gloo, 1 thread each), every weight trainable; then saved twice, as ayar saves it:
`sharding.save_by_parts` (each process writes its parts, rank 0 joins the files a weight at a time) and
`sharding.trained_state` + `adapters.save_trained` (gathered whole on rank 0, which saves it with save_pretrained,
atomically). Before each save every process's peak RSS is reset (Linux: /proc/self/clear_refs), so its peak after
the save less its RSS before is what that save added. No training: a run's own peak (weights, gradients, AdamW
states, activations) usually hides these (benchmarks/README.md).

    .venv/bin/python benchmarks/fsdp_save.py --nproc 2,4,6 [--out benchmarks/results-fsdp-save-step.json]

Needs the default model converted once (any `ayar train` with `model.name: default` does it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from fsdp_loading import machine, make_models  # noqa: E402


def _rss_kb() -> dict:
    status = Path("/proc/self/status").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmHWM", "VmRSS"))}


def _added_mb(save) -> tuple[float, float]:
    """What `save()` adds to this process's peak RSS (MB), and its seconds."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the RSS now
    before = _rss_kb()["VmRSS"]
    start = time.perf_counter()
    save()
    seconds = time.perf_counter() - start
    return round((_rss_kb()["VmHWM"] - before) / 1024), round(seconds, 1)


def _process(rank: int, nproc: int, model_dir: str, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from ayar.config.schema import DistributedConfig
    from ayar.models.adapters import save_trained
    from ayar.models.device import choose_placement
    from ayar.models.load import empty_model
    from ayar.training import sharding
    from ayar.training.allocator import tune_allocator
    from ayar.training.distributed import World

    tune_allocator()  # freed memory handed back at once, as the runs this measures do (training.return_memory)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=nproc)
    world = World(nproc, rank, rank)
    model = empty_model(model_dir, choose_placement("cpu", "float32"))
    for p in model.parameters():
        p.requires_grad_(True)
    root = sharding.shard(model, DistributedConfig(strategy="fsdp"), "cpu", nproc, rank, model_dir)

    def gathered() -> None:
        whole = sharding.trained_state(root)
        if world.main:
            save_trained(model, Path(out) / "whole", state_dict=whole)
        dist.barrier()

    parts = _added_mb(lambda: sharding.save_by_parts(root, model, Path(out) / "parts", world))
    whole = _added_mb(gathered)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"parts": parts, "whole": whole}))
    dist.destroy_process_group()


def _same_weights(a: Path, b: Path) -> None:
    """Both saves hold the same weights (compared one at a time)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key


def measure(model_dir: Path, nproc: int) -> dict:
    import torch

    from ayar.netutil import free_port

    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(_process, args=(nproc, str(model_dir), free_port(), out), nprocs=nproc)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(nproc)]
        _same_weights(Path(out) / "parts" / "model.safetensors", Path(out) / "whole" / "model.safetensors")
    return {
        "nproc": nproc,
        "parts_added_mb_per_rank": [r["parts"][0] for r in ranks],
        "whole_added_mb_per_rank": [r["whole"][0] for r in ranks],
        "parts_seconds": ranks[0]["parts"][1],
        "whole_seconds": ranks[0]["whole"][1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", default="2,4,6", help="comma-separated process counts")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results-fsdp-save-step.json"))
    args = ap.parse_args()
    results = {"machine": machine(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_models(Path(tmp))["float32"]
        for nproc in map(int, args.nproc.split(",")):
            row = measure(model_dir, nproc)
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
