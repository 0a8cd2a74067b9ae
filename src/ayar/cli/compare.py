"""Train the same config with several fine-tuning methods (same data, seed and steps) and compare them.

examples:
  ayar compare examples/quickstart.yaml --methods lora,dora,pissa,qlora,full
  ayar compare data.train=my.jsonl training.max_steps=50 --methods lora,dora --out runs/compare

Each method trains in its own process (so its peak memory is its own) into OUT/<method>-<time>/, a full
run directory. OUT/compare.md, compare.json and compare.png hold the table and plots: final eval loss,
train loss, wall time, tokens/s, peak RAM and trainable parameters, and the eval-loss curves.
"""

# method name -> the overrides that select it (all through the one conversion point, models/adapters.py)
METHODS = {
    "lora": [],
    "dora": ["method=dora"],
    "rslora": ["lora.rslora=true"],
    "loraplus": ["training.loraplus_lr_ratio=16"],
    "pissa": ["lora.init=pissa"],
    "olora": ["lora.init=olora"],
    "qlora": ["method=qlora"],
    "full": ["method=full"],
}


INTERMIXED = True  # options may come between the overrides


def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", help="training YAML (see examples/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every method")
    p.add_argument("--methods", default="lora,dora", help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--out", default="runs/compare", help="parent folder of the runs and the comparison")


def run(args) -> int:
    import subprocess
    import sys
    from pathlib import Path

    from ayar.cli import config_and_overrides
    from ayar.config import load_config
    from ayar.errors import AyarError

    config, overrides = config_and_overrides(args.config, args.overrides)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise AyarError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    load_config(config, overrides)  # a bad config fails here, once, not once per method
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for method in methods:
        print(f"== {method} ==", flush=True)
        before = set(out.glob(f"{method}-*"))
        cmd = [
            sys.executable,
            "-m",
            "ayar",
            "train",
            *([config] if config else []),
            *overrides,
            *METHODS[method],
            f"output.dir={out}",
            f"output.name={method}",
            "output.path=null",  # each method its own directory
        ]
        if subprocess.run(cmd).returncode != 0:
            raise AyarError(f"training with method {method} failed (its error is above); command: {' '.join(cmd)}")
        (run_dir,) = set(out.glob(f"{method}-*")) - before
        rows[method] = _summary(run_dir)
    write_comparison(out, rows)
    print((out / "compare.md").read_text())
    print(f"comparison: {out / 'compare.md'}, {out / 'compare.png'}, {out / 'compare.json'}")
    return 0


def _summary(run_dir) -> dict:
    import json

    meta = json.loads((run_dir / "run.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "run": str(run_dir),
        "final_eval_loss": meta.get("final_eval_loss"),
        "final_loss": meta.get("final_loss"),
        "train_seconds": meta.get("train_seconds"),
        "tokens_per_s": meta.get("tokens_per_s"),
        "peak_rss_mb": meta.get("peak_rss_mb"),
        "trainable_params": meta["params"]["trainable"],
        "eval_curve": [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m],
    }


def write_comparison(out, rows: dict) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    head = (
        "| method | eval loss | train loss | train s | tokens/s | peak RAM MB | trainable params "
        "|\n|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {m} | {_num(r['final_eval_loss'], 4)} | {_num(r['final_loss'], 4)} | {_num(r['train_seconds'], 1)} | "
        f"{_num(r['tokens_per_s'], 1)} | {_num(r['peak_rss_mb'], 0)} | {r['trainable_params']:,} |\n"
        for m, r in rows.items()
    )
    (out / "compare.md").write_text(head + body)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for method, r in rows.items():
        if r["eval_curve"]:
            steps, losses = zip(*r["eval_curve"])
            axes[0].plot(steps, losses, marker="o", label=method)
    axes[0].set(title="eval loss", xlabel="step")
    axes[0].legend()
    for ax, key, title in zip(
        axes[1:],
        ("tokens_per_s", "peak_rss_mb", "trainable_params"),
        ("tokens/s", "peak RAM (MB)", "trainable parameters"),
    ):
        ax.bar(list(rows), [rows[m][key] or 0 for m in rows])
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)
    plt.close(fig)


def _num(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"
