"""Fine-tune a model: SFT (LoRA, QLoRA, DoRA, QDoRA, PiSSA, OLoRA, full), preference alignment (DPO, IPO, KTO,
ORPO, SimPO), reward models, GRPO, classification.

examples:
  ayar train examples/quickstart.yaml
  ayar train examples/quickstart.yaml lora.r=32 training.max_steps=50
  ayar train data.train=my.jsonl model.name=/models/qwen2-0.5b     (no file: defaults + overrides)
  ayar train examples/quickstart.yaml --print-config
  ayar train --resume runs/quickstart-20261125-101500
  ayar train examples/dpo.yaml model.name=runs/quickstart-20261125-101500   (DPO from an SFT run)
"""


def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (see examples/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.r=32 training.max_steps=50")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")


def run(args) -> int:

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
        return 0
    cfg = load_config(config, overrides)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    from ayar.api import train

    train(cfg)  # the Python API's function: the CLI parses arguments, the API does the rest
    return 0
