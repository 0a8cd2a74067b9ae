"""Work with configs without training.

examples:
  ayar config validate examples/quickstart.yaml lora.r=32
  ayar config validate examples/hpo.yaml hpo.trials=8
  ayar config reference          (Markdown table of every key, as in docs/config.md)
  ayar config import llama3_lora_sft.yaml --out mine.yaml   (a LLaMA-Factory or Axolotl YAML as ayar's)
"""


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    v = sub.add_parser("validate", help="check a config (and overrides); prints the resolved config")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    sub.add_parser("reference", help="print the Markdown reference of every config key")
    i = sub.add_parser("import", help="convert a LLaMA-Factory or Axolotl YAML to an ayar config")
    i.add_argument("config")
    i.add_argument("--out", help="write the converted config here (default: print it)")
    i.add_argument("--force", action="store_true", help="replace --out when it exists")


def run(args) -> int:
    if args.action == "import":
        return _import(args)
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


def _import(args) -> int:
    import sys
    from pathlib import Path

    import yaml

    from ayar.config import TrainConfig
    from ayar.config.importer import import_config
    from ayar.config.loader import from_dict, read_yaml
    from ayar.errors import ConfigError

    source = Path(args.config)
    result = import_config(read_yaml(source), source.parent)
    from_dict(TrainConfig, result.config, where=f"{source} as an ayar config")  # what it maps to must be valid
    lines = [f"# converted by `ayar config import` from {source} ({result.tool})"]
    lines += [f"# not mapped: {u}" for u in result.unmapped]
    if result.ignored:
        lines.append(f"# not needed by ayar: {', '.join(sorted(result.ignored))}")
    text = "\n".join(lines) + "\n" + yaml.safe_dump(result.config, sort_keys=False)
    if args.out:
        out = Path(args.out)
        if out.exists() and not args.force:
            raise ConfigError(f"--out {out} exists: pass --force to replace it, or choose a new file")
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text, end="")
    for u in result.unmapped:
        print(f"not mapped: {u}", file=sys.stderr)
    return 0
