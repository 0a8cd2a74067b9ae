"""Loss-curve PNG from metrics.jsonl records."""

from __future__ import annotations

from pathlib import Path


def plot_loss(records: list[dict], out: Path, mark_step: int | None = None, mark_label: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    # the learning rate and the gradient norm (before clipping) beside the loss, where the run logged them
    extra = [
        (name, [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))])
        for name, key in (("learning rate", "lr"), ("gradient norm", "grad_norm"))
    ]
    extra = [(name, points) for name, points in extra if points]
    fig, axes = plt.subplots(
        1 + len(extra),
        1,
        figsize=(7, 4 + 1.6 * len(extra)),
        dpi=100,
        sharex=True,
        gridspec_kw={"height_ratios": [3] + [1] * len(extra)},
        squeeze=False,
    )
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    if mark_step is not None:
        ax.axvline(mark_step, color="#c00000", linestyle="--", label=mark_label or f"step {mark_step}")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    for (name, points), row in zip(extra, axes[1:]):
        row[0].plot(*zip(*points), linewidth=1.0, color="#555555")
        row[0].set_ylabel(name, fontsize=8)
        row[0].grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
