"""Training in several processes on this machine (and others), through torchrun (torch.distributed.run): the
command `ayar train --nproc N` runs, and the same for the Python API and the web UI (`ayar.train(cfg, nproc=N)`),
which cannot hand their config to torchrun's processes other than as a file. And the other side: what `accelerate
launch` tells a process it started (its strategy flags, config file), read once into the run's config
(`from_accelerate_launch`).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from ayar.config.importer import deepspeed_offload, fsdp_shard, read_deepspeed_file, zero_stage
from ayar.errors import AyarError, ConfigError


def processes(nproc) -> int:
    """`--nproc` / `nproc=` as a number of processes: a whole number, or `auto`: one per GPU this machine shows
    (torchrun's `--nproc-per-node gpu`), one process where it has none."""
    if str(nproc).strip().lower() == "auto":
        import torch

        return max(torch.cuda.device_count(), 1)
    text = str(nproc).strip()
    if isinstance(nproc, bool) or not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--nproc {nproc!r}: give a number of processes (1 or more), or auto (one per GPU)")
    return int(text)


def torchrun_command(
    ayar_args: list[str],
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    rdzv_timeout: int | None = None,
) -> list[str]:
    """The torchrun command that runs `ayar train AYAR_ARGS` in `nproc` processes here (on each of `nnodes`
    machines meeting at `rdzv_endpoint`, waiting up to `rdzv_timeout` seconds for each other: torchrun's
    `join_timeout`, 600 unless given)."""
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
        if rdzv_timeout is not None:
            cmd += ["--rdzv-conf", f"join_timeout={int(rdzv_timeout)}"]
    return cmd + ["-m", "ayar", "train", *ayar_args]


def run_torchrun(cmd: list[str]) -> int:
    """A `torchrun_command`, run in this process (torchrun's agent; the workers are its children): where a worker
    fails, its own error (printed once, by rank 0) ends the output, with one line here instead of torchrun's
    traceback. Returns the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    args = parse_args(cmd[3:])
    try:
        torchrun(args)
    except RendezvousError as e:  # the machines did not meet: torchrun's own traceback says no more than this
        print(
            f"error: the {args.nnodes} machines did not meet at {args.rdzv_endpoint} ({type(e).__name__}"
            + (f": {e}" if str(e) else "")
            + "). Run the same `ayar train ... --nnodes N --rdzv-endpoint HOST:PORT` on each machine, HOST:PORT one "
            "of them that the others can reach; --rdzv-timeout sets how long they wait for each other",
            file=sys.stderr,
        )
        return 1
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


# --- the other side: a process `accelerate launch` started ---------------------------------------------------------
# accelerate launch hands its flags (and those of its own config file, `accelerate config`) to the processes it
# starts as environment variables (accelerate/utils/launch.py). ayar reads them once, into the run's config, and takes
# them out of the environment: below it transformers and accelerate would read them again, each its own way (a
# Trainer stage ran accelerate's FSDP or bf16 policy where ayar planned data parallel in fp32, ayar's own loop
# silently ran data parallel).
_TAKEN = (
    "ACCELERATE_USE_FSDP",
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_MIXED_PRECISION",
    "ACCELERATE_USE_CPU",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "ACCELERATE_GRADIENT_CLIPPING",
    "ACCELERATE_CONFIG_DS_FIELDS",
)
_TAKEN_PREFIXES = ("FSDP_", "ACCELERATE_DEEPSPEED_")
_MIXED = {"bf16": "bfloat16", "fp16": "float16"}
_SAY_FLAGS = "accelerate launch (its flags or its config file, `accelerate config`)"


def _flag(env, name: str) -> bool:
    return env.get(name, "false").strip().lower() in ("true", "1", "yes")


def _from_deepspeed_file(path: str, said: list, notes: list) -> None:
    """What ayar takes from a DeepSpeed config file given to accelerate launch (`--deepspeed_config_file`): the ZeRO
    stage, offload, accumulation and clipping; ayar writes the rest of DeepSpeed's config from the run's own."""
    where = f"--deepspeed_config_file {path}"
    ds = read_deepspeed_file(Path(path), where)
    if ds.stage is not None:
        said.append(("distributed.zero_stage", _zero_stage(ds.stage, f"{where} (zero_optimization.stage)"), where))
    if ds.offload:
        said.append(("distributed.offload", _offload(ds.offload, where), where))
    if ds.grad_accum is not None:
        said.append(
            ("training.grad_accum", _positive_int(ds.grad_accum, f"{where} (gradient_accumulation_steps)"), where)
        )
    if ds.clipping is not None:
        said.append(("training.max_grad_norm", _number(ds.clipping, f"{where} (gradient_clipping)"), where))
    if ds.unused:
        notes.append(
            f"not used from {path}: {', '.join(ds.unused)} (ayar writes DeepSpeed's config from the run's config: "
            "the training section's batch, optimizer and schedule, distributed.zero_stage and offload)"
        )


def _zero_stage(value, where: str) -> int:
    stage, why = zero_stage(value)
    if why:
        raise ConfigError(
            f"{where} asks for {why}; ask for 2 or 3, or launch without DeepSpeed for plain data parallel"
        )
    return stage


def _offload(devices: list, where: str) -> bool:
    offload, why = deepspeed_offload(devices)
    if why:
        raise ConfigError(f"{where} asks for {why}")
    return offload


def _positive_int(value, where: str) -> int:
    text = str(value).strip()
    if not isinstance(value, bool) and text.isdigit() and int(text) >= 1:
        return int(text)
    raise ConfigError(f"{where} is {value!r}: give a whole number of micro-batches, 1 or more")


def _number(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if number < 0:
        raise ConfigError(f"{where} is {value!r}: give a gradient norm, 0 or more")
    return number


def _launcher_said(env) -> tuple[list, list]:
    """(config field, value, the flag that said it) for everything accelerate launch said that is not its default,
    and notes to print. Refuses what ayar cannot run, each with the way out."""
    said, notes = [], []
    if _flag(env, "ACCELERATE_USE_MEGATRON_LM") or _flag(env, "ACCELERATE_USE_PARALLELISM_CONFIG"):
        raise ConfigError(
            f"{_SAY_FLAGS} asks for Megatron-LM or tensor/context parallelism: ayar trains with data parallel, FSDP "
            "or DeepSpeed ZeRO; launch with --multi_gpu, --use_fsdp or --use_deepspeed (or set distributed.strategy)"
        )
    if _flag(env, "ACCELERATE_USE_FSDP"):
        said.append(("distributed.strategy", "fsdp", "--use_fsdp"))
        given = env.get("FSDP_SHARDING_STRATEGY"), env.get("FSDP_RESHARD_AFTER_FORWARD")
        shard, why = fsdp_shard(*given)
        if why:
            raise ConfigError(
                f"{_SAY_FLAGS} says --fsdp_sharding_strategy / --fsdp_reshard_after_forward {why}; for gradients "
                "and optimizer states split alone launch with --use_deepspeed --zero_stage 2, for no splitting "
                "--multi_gpu"
            )
        if shard != "full":  # hybrid, as either flag may say it
            said.append(("distributed.shard", shard, "--fsdp_sharding_strategy HYBRID_SHARD"))
        if _flag(env, "FSDP_OFFLOAD_PARAMS"):
            said.append(("distributed.offload", True, "--fsdp_offload_params true"))
        if _flag(env, "FSDP_ACTIVATION_CHECKPOINTING"):
            said.append(("training.gradient_checkpointing", True, "--fsdp_activation_checkpointing true"))
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        if said and said[0][1] == "fsdp":
            raise ConfigError(f"{_SAY_FLAGS} asks for both FSDP and DeepSpeed; launch with one of them")
        said.append(("distributed.strategy", "deepspeed", "--use_deepspeed"))
        if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            _from_deepspeed_file(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"], said, notes)
        if "ACCELERATE_DEEPSPEED_ZERO_STAGE" in env:
            stage = env["ACCELERATE_DEEPSPEED_ZERO_STAGE"].strip()
            said.append(
                ("distributed.zero_stage", _zero_stage(stage, f"{_SAY_FLAGS}'s --zero_stage"), f"--zero_stage {stage}")
            )
        devices = [
            env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{k}_DEVICE", "none").strip().lower() for k in ("OPTIMIZER", "PARAM")
        ]
        if any(d != "none" for d in devices):
            flag = "--offload_optimizer_device / --offload_param_device " + "/".join(devices)
            said.append(("distributed.offload", _offload(devices, _SAY_FLAGS), flag))
    mixed = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if mixed not in ("no", *_MIXED):
        raise ConfigError(
            f"{_SAY_FLAGS} says --mixed_precision {mixed}: ayar computes in bf16 or fp16 (model.dtype); launch "
            "with --mixed_precision bf16, fp16 or no"
        )
    if mixed in _MIXED:
        said.append(("model.dtype", _MIXED[mixed], f"--mixed_precision {mixed}"))
    if _flag(env, "ACCELERATE_USE_CPU"):
        said.append(("model.device", "cpu", "--cpu"))
    if "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" in env:
        steps = _positive_int(env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"].strip(), "--gradient_accumulation_steps")
        said.append(("training.grad_accum", steps, "--gradient_accumulation_steps"))
    if "ACCELERATE_GRADIENT_CLIPPING" in env:
        clip = _number(env["ACCELERATE_GRADIENT_CLIPPING"].strip(), "--gradient_clipping")
        said.append(("training.max_grad_norm", clip, "--gradient_clipping"))
    return said, notes


def from_accelerate_launch(cfg, resuming: bool = False, env=None):
    """`cfg` (a TrainConfig) with what accelerate launch said (`env`: this process's environment): its strategy
    (`--use_fsdp`, `--use_deepspeed`), their options, `--mixed_precision`, `--cpu`, accumulation and clipping. A value
    the launcher set applies where the config leaves that field at its default, as if the config had said it; where
    both said different things the run stops (which was meant cannot be told), and a resumed run keeps what it was
    trained with. The variables read are then taken out of `env`. Returns (config, lines to print)."""
    import copy

    env = os.environ if env is None else env
    said, notes = _launcher_said(env)
    cfg = copy.deepcopy(cfg)
    adopted = []
    for path, value, flag in said:
        section, name = path.split(".")
        holder = getattr(cfg, section)
        current, default = getattr(holder, name), type(holder).__dataclass_fields__[name].default
        if current == value:
            continue
        if resuming or current != default:
            why = "the run being resumed was trained with" if resuming else "the config says"
            raise ConfigError(
                f"{_SAY_FLAGS} says {flag} ({path}: {value}), but {why} {path}: {current}. Make them agree: drop "
                "the flag from accelerate launch (or from its config file: `accelerate env` names it)"
                + ("" if resuming else f", or set {path}: {value} in the config")
            )
        setattr(holder, name, value)
        adopted.append(f"{path} {value} ({flag})")
    if adopted:
        notes.insert(0, "launch from accelerate launch: " + ", ".join(adopted))
    for name in [k for k in env if k in _TAKEN or k.startswith(_TAKEN_PREFIXES)]:
        del env[name]
    return cfg, notes
