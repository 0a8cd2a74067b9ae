"""Overfitting check from a run's metrics: the step where eval loss turned up while train loss kept falling."""

from __future__ import annotations


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def overfitting(
    records: list[dict], tolerance: float = 0.01, patience: int = 0, best_step_kept: int | None = None
) -> dict:
    """`records`: metrics.jsonl entries ({"step", "loss"} and {"step", "eval_loss"}).

    Overfitting = after the step with the lowest eval loss, eval loss rose by more than `tolerance`
    (relative) while the train loss averaged over the same steps was lower than before that step.
    """
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    if len(evals) < 3:
        return {
            "status": "unknown",
            "message": f"{len(evals)} evaluation(s) in the run: set training.eval_steps to check for overfitting",
        }
    best_step, best = min(evals, key=lambda e: (e[1], e[0]))
    rose = [(s, v) for s, v in evals if s > best_step and v > best * (1 + tolerance)]
    before = _mean([v for s, v in train if s <= best_step][-max(1, len(train) // 4) :])
    after = _mean([v for s, v in train if s > best_step])
    out = {
        "turn_step": best_step,
        "best_eval_loss": best,
        "final_eval_loss": evals[-1][1],
        "train_loss_before": before,
        "train_loss_after": after,
    }
    if not rose:
        return {
            **out,
            "status": "none",
            "message": f"eval loss did not turn up (lowest {best:.4f} at step {best_step})",
        }
    if after is None or before is None or after >= before:
        return {
            **out,
            "status": "eval_rose",
            "message": f"eval loss rose after step {best_step}, but train loss did not keep falling",
        }
    caught = bool(patience) and best_step_kept == best_step
    tail = (
        "early stopping caught it: the saved adapter is the one from that step"
        if caught
        else "early stopping did not catch it: the saved adapter is from a later step"
        + ("" if patience else " (training.early_stopping_patience is 0)")
    )
    return {
        **out,
        "status": "overfitting",
        "caught_by_early_stopping": caught,
        "message": f"overfitting from step {best_step}: eval loss {best:.4f} -> {evals[-1][1]:.4f} while train loss "
        f"fell {before:.4f} -> {after:.4f}; {tail}",
    }
