"""Work with configs without training.

examples:
  ayar config validate examples/quickstart.yaml lora.r=32
  ayar config validate examples/hpo.yaml hpo.trials=8
  ayar config reference          (Markdown table of every key, as in the README)
"""


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    v = sub.add_parser("validate", help="check a config (and overrides); prints the resolved config")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    sub.add_parser("reference", help="print the Markdown reference of every config key")


def run(args) -> int:
    if args.action == "reference":
        from ayar.config.reference import config_reference

        print(config_reference(), end="")
        return 0
    import yaml

    from ayar.config import config_to_dict, load_config
    from ayar.config.loader import read_yaml

    if "hpo" in read_yaml(args.config):  # an `ayar hpo` file: the training config plus its search
        from ayar.config.loader import from_dict
        from ayar.training.hpo import load_hpo_config

        base, hcfg = load_hpo_config(args.config, args.overrides)
        cfg = from_dict(type(load_config(None)), base, where=args.config)
        print(yaml.safe_dump({**config_to_dict(cfg), "hpo": config_to_dict(hcfg)}, sort_keys=False), end="")
    else:
        cfg = load_config(args.config, args.overrides)
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    print(f"# {args.config}: valid")
    return 0
