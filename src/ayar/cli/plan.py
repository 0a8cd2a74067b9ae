"""Predict a training run's peak memory before it starts, and whether it fits this machine.

examples:
  ayar plan examples/quickstart.yaml
  ayar plan examples/quickstart.yaml training.batch_size=32 data.max_length=2048
"""


def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", help="training YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.batch_size=16")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args) -> int:
    import json

    from ayar.cli import config_and_overrides
    from ayar.config import load_config
    from ayar.training.plan import plan_for_config

    config, overrides = config_and_overrides(args.config, args.overrides)
    cfg = load_config(config, overrides)
    plan, fixes, layout = plan_for_config(cfg, log=lambda m: None)
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
                    "suggestions": fixes,
                    "layout": vars(layout),
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
