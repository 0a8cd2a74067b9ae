"""Fine-tune a model: SFT (LoRA, QLoRA, DoRA, QDoRA, PiSSA, OLoRA, full), preference alignment (DPO, IPO, KTO,
ORPO, SimPO), reward models, GRPO, classification.

examples:
  ayar train examples/quickstart.yaml
  ayar train examples/quickstart.yaml lora.r=32 training.max_steps=50
  ayar train data.train=my.jsonl model.name=/models/qwen2-0.5b     (no file: defaults + overrides)
  ayar train examples/quickstart.yaml --print-config
  ayar train --resume runs/quickstart-20261125-101500
  ayar train examples/dpo.yaml model.name=runs/quickstart-20261125-101500   (DPO from an SFT run)
  ayar train examples/quickstart.yaml --nproc 2       (2 processes on this machine, through torchrun)
  ayar train cfg.yaml --nproc 8 --nnodes 4 --node-rank 0 --rdzv-endpoint head:29500   (on each of 4 nodes)
  torchrun --nproc_per_node 2 -m ayar train cfg.yaml
  accelerate launch --multi_gpu --num_processes 2 -m ayar train cfg.yaml
"""

INTERMIXED = True  # options may come between the overrides


def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (see examples/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.r=32 training.max_steps=50")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    g = p.add_argument_group("several processes (data parallel, through torchrun)")
    g.add_argument(
        "--nproc", default="1", help="processes on this machine (one per GPU; gloo on CPU), or auto: one per GPU"
    )
    g.add_argument("--nnodes", type=int, default=1, help="machines taking part (run the same command on each)")
    g.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0 .. nnodes-1")
    g.add_argument("--rdzv-endpoint", help="HOST:PORT where the machines meet (several machines)")
    g.add_argument(
        "--rdzv-timeout", type=int, help="seconds the machines wait for each other to join (torchrun's default: 600)"
    )


def launch_command(args, argv: list[str]) -> list[str]:
    """The torchrun command that runs this `ayar train` in `--nproc` processes (and `--nnodes` machines)."""
    from ayar.training.launch import processes, torchrun_command

    skip = {"--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-timeout"}
    rest, it = [], iter(argv)
    for a in it:
        if a in skip:
            next(it, None)
        elif a.split("=", 1)[0] not in skip:
            rest.append(a)
    nproc = processes(args.nproc)
    return torchrun_command(rest, nproc, args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_timeout)


def run(args) -> int:
    import sys

    from ayar.training.launch import processes, run_torchrun, under_launcher

    args.nproc = processes(args.nproc)
    if (args.nproc > 1 or args.nnodes > 1) and not under_launcher() and not args.print_config:
        cmd = launch_command(args, args.argv)
        print("launch " + " ".join(cmd), file=sys.stderr)
        if args.nnodes > 1:
            print(
                f"launch waiting for {args.nnodes} machines at {args.rdzv_endpoint} (the same command on each; up to "
                f"{args.rdzv_timeout or 600} s)",
                file=sys.stderr,
            )
        return run_torchrun(cmd)

    import yaml

    from ayar.cli import config_and_overrides
    from ayar.config import config_to_dict, load_config

    config, overrides = config_and_overrides(args.config, args.overrides)
    if args.resume:
        if config or overrides:
            from ayar.errors import ConfigError

            raise ConfigError(
                "--resume continues a run with its saved config; do not pass a config or overrides with it"
            )
        from ayar.api import train

        train(resume=args.resume)
        return _done()
    cfg = load_config(config, overrides)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    from ayar.api import train

    train(cfg)  # the Python API's function: the CLI parses arguments, the API does the rest
    return _done()


def _done() -> int:
    """A finished run: a process of several ends at once (training/launch.py `end_worker`), one process returns."""
    from ayar.training.launch import end_worker, under_launcher

    if under_launcher():
        end_worker()
    return 0
