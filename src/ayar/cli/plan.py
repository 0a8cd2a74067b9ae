"""Predict a training run's peak memory before it starts, and whether it fits this machine or another one.

examples:
  ayar plan examples/quickstart.yaml
  ayar plan examples/quickstart.yaml training.batch_size=32 data.max_length=2048
  ayar plan model.name=models/llama-3.1-8b method=qlora lora.r=32 data.max_length=2048 --device cuda --gpu-memory 24GB
  ayar plan cfg.yaml method=full --device cuda --gpu-memory 80GB --nproc 8 --strategy zero3

A model folder holding only config.json is enough (nothing is downloaded): without a tokenizer the plan assumes
every row is data.max_length tokens long. With --nproc the numbers are per process (per GPU).
"""

_UNITS = {"": 2**30, "gb": 2**30, "gib": 2**30, "mb": 2**20, "mib": 2**20, "tb": 2**40}


INTERMIXED = True  # options may come between the overrides


def add_arguments(p) -> None:
    from ayar.training.memory import STRATEGIES

    p.add_argument("config", nargs="?", help="training YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.batch_size=16")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    t = p.add_argument_group("a target that is not this machine")
    t.add_argument("--device", choices=("cpu", "cuda"), help="plan for this device type (default: this machine's)")
    t.add_argument("--gpu-memory", metavar="SIZE", help="memory per device, e.g. 24GB, 80GB, 16000MB")
    t.add_argument("--nproc", type=int, default=1, help="data-parallel processes (GPUs) in all (default 1)")
    t.add_argument(
        "--strategy", choices=STRATEGIES, help="how ranks share the model (default: the config's distributed section)"
    )
    t.add_argument("--offload", action="store_true", help="ZeRO / FSDP offload to CPU RAM (default: the config's)")


def memory_size(text: str) -> int:
    import re

    from ayar.errors import AyarError

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text or "")
    if not m or m.group(2).lower() not in _UNITS:
        raise AyarError(f"--gpu-memory {text!r}: write a size such as 24GB, 80GB or 16000MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def target_of(args, cfg):
    """The Target of the flags, or None for this machine. Processes share the model as the config's `distributed`
    section says (`distributed.strategy`, `zero_stage`, `offload`) unless --strategy / --offload say otherwise."""
    from ayar.errors import AyarError
    from ayar.training.memory import Sharding
    from ayar.training.plan import Target, configured_sharding

    if (
        args.device is None
        and args.gpu_memory is None
        and args.nproc == 1
        and args.strategy in (None, "ddp")
        and not args.offload
    ):
        return None
    if args.nproc < 1:
        raise AyarError(f"--nproc {args.nproc}: at least 1")
    device = args.device or ("cuda" if args.gpu_memory else "cpu")
    memory = memory_size(args.gpu_memory) if args.gpu_memory else None
    if device == "cuda" and memory is None:
        import torch

        if not torch.cuda.is_available():
            raise AyarError(
                "--device cuda on a machine without a GPU: say how much memory it has, e.g. --gpu-memory 24GB"
            )
    configured = configured_sharding(cfg, args.nproc)
    strategy = args.strategy or configured.strategy
    offload = args.offload or (args.strategy is None and configured.offload)
    return Target(device, memory, Sharding(args.nproc, strategy, offload))


def run(args) -> int:
    import json

    from ayar.cli import config_and_overrides
    from ayar.config import load_config
    from ayar.training.plan import plan_for_config

    config, overrides = config_and_overrides(args.config, args.overrides)
    cfg = load_config(config, overrides)
    target = target_of(args, cfg)
    notes = []
    plan, fixes, layout = plan_for_config(cfg, log=notes.append, target=target)
    if not args.json:
        for note in notes:
            print(f"note: {note}")
    if args.json:
        print(
            json.dumps(
                {
                    "parts": plan.parts,
                    "total": plan.total,
                    "available": plan.available,
                    "device": plan.device,
                    "fits": plan.fits,
                    "tokens": plan.tokens,
                    "trained": plan.trained,
                    "heaviest_pass": vars(plan.heaviest) if plan.heaviest else None,
                    "suggestions": fixes,
                    "layout": vars(layout),
                    "offloaded": plan.offloaded,
                    "per_rank": plan.per_rank,
                    "notes": notes,
                },
                indent=1,
            )
        )
        return 0 if plan.fits else 1
    passes = f"passes of {layout.per_pass} rows" if layout.per_pass else "one pass per micro-batch"
    print(
        f"memory plan for batch {cfg.training.batch_size}, max_length {cfg.data.max_length}, {passes}, "
        f"{'padding-free' if layout.packed else 'padded'}, "
        f"{'fused decoder' if layout.fused else 'transformers + peft modules'}, "
        f"gradient checkpointing {'on' if layout.checkpointing else 'off'}, {cfg.method} r={cfg.lora.r}:"
    )
    print(plan.table())
    if plan.fits:
        print(f"fits: {100 * plan.total / plan.available:.0f}% of available memory")
        return 0
    print(
        "does NOT fit. Settings that would:" if fixes else "does NOT fit, and no single setting change found that fits."
    )
    for f in fixes:
        print(f"  {f}")
    return 1
