"""Training in several processes on this machine (and others), through torchrun (torch.distributed.run): the
command `ayar train --nproc N` runs, and the same for the Python API and the web UI (`ayar.train(cfg, nproc=N)`),
which cannot hand their config to torchrun's processes other than as a file.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from ayar.errors import AyarError, ConfigError


def torchrun_command(
    ayar_args: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None
) -> list[str]:
    """The torchrun command that runs `ayar train AYAR_ARGS` in `nproc` processes here (on each of `nnodes`
    machines meeting at `rdzv_endpoint`)."""
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ConfigError("--nproc and --nnodes must be >= 1, and --node-rank between 0 and --nnodes - 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes == 1:
        cmd.append("--standalone")  # one machine: a local rendezvous on a free port
    else:
        if not rdzv_endpoint:
            raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every machine)")
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank)]
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", "ayar-train"]
    return cmd + ["-m", "ayar", "train", *ayar_args]


def run_torchrun(cmd: list[str]) -> int:
    """A `torchrun_command`, run in this process (torchrun's agent; the workers are its children): where a worker
    fails, its own error (printed once, by rank 0) ends the output, with one line here instead of torchrun's
    traceback. Returns the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    try:
        torchrun(parse_args(cmd[3:]))
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        print(
            f"error: {len(e.failures)} of the training processes ended with exit code "
            f"{', '.join(map(str, codes))}; the first error is above",
            file=sys.stderr,
        )
        return next((c for c in codes if c > 0), 1)
    return 0


def under_launcher() -> bool:
    """True in a process torchrun / accelerate launch started (it must train, not launch again)."""
    return "WORLD_SIZE" in os.environ


def end_worker() -> None:
    """End a training process torchrun / accelerate launch started, once its run is complete (saved, process group
    destroyed), without the interpreter's teardown. In that teardown a process of a 2-process run on gloo now and
    then aborted ("terminate called without an active exception": a C++ thread of torch.distributed left joinable;
    seen in this project's FSDP test runs) after everything was saved, and the launcher then reported the finished
    run as failed. Nothing is left to run here: output is flushed, atexit handlers are skipped."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train_in_processes(cfg, nproc: int, resume: str | Path | None = None) -> Path:
    """Train `cfg` (a TrainConfig), or continue the run `resume`, in `nproc` processes on this machine; returns the
    run directory. The run's folder is decided here (the processes write there), the config handed over as YAML."""
    import yaml

    from ayar.config import config_to_dict
    from ayar.rundir import RunDir

    with tempfile.TemporaryDirectory(prefix="ayar-launch-") as tmp:
        if resume is not None:
            path, args = Path(resume), ["--resume", str(resume)]
        else:
            out = cfg.output
            path = RunDir.check_new(out.path) if out.path else RunDir.new_path(out.dir, out.name)
            config = Path(tmp) / "config.yaml"
            config.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            args = [str(config), f"output.path={path}"]
        code = run_torchrun(torchrun_command(args, nproc))
    if code:
        raise AyarError(f"training in {nproc} processes failed (exit code {code}); the first error is above")
    return path
