"""Metrics on strings and labels. Each is a plain function, tested against hand-computed values."""

from __future__ import annotations

import math


def exact_match(predictions: list[str], references: list[str], extract) -> dict:
    pairs = [(extract(p), extract(r)) for p, r in zip(predictions, references)]
    hits = [p is not None and p == r for p, r in pairs]
    return {
        "exact_match": sum(hits) / max(len(hits), 1),
        "extracted": sum(p is not None for p, _ in pairs) / max(len(pairs), 1),
        "per_row": hits,
    }


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score, with stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return sum(scores) / max(len(scores), 1)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100)."""
    import sacrebleu

    return sacrebleu.corpus_bleu(predictions, [references]).score


def classification(predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, and precision/recall/F1 per class and macro-averaged over the classes of the references."""
    norm = lambda s: " ".join(str(s).split()).lower()
    preds, gold = [norm(p) for p in predictions], [norm(g) for g in labels]
    per_class = {}
    for c in sorted(set(gold)):
        tp = sum(p == c and g == c for p, g in zip(preds, gold))
        fp = sum(p == c and g != c for p, g in zip(preds, gold))
        fn = sum(p != c and g == c for p, g in zip(preds, gold))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[c] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    macro = lambda k: sum(v[k] for v in per_class.values()) / max(len(per_class), 1)
    return {
        "accuracy": sum(p == g for p, g in zip(preds, gold)) / max(len(gold), 1),
        "precision_macro": macro("precision"),
        "recall_macro": macro("recall"),
        "f1_macro": macro("f1"),
        "per_class": per_class,
    }


def perplexity(mean_loss: float | None) -> float | None:
    return None if mean_loss is None else math.exp(min(mean_loss, 50))


def preference(chosen_logps: list[float], rejected_logps: list[float]) -> dict:
    """Preference accuracy (chosen scored above rejected) and mean reward margin (log-prob difference)."""
    margins = [c - r for c, r in zip(chosen_logps, rejected_logps)]
    return {
        "preference_accuracy": sum(m > 0 for m in margins) / max(len(margins), 1),
        "reward_margin": sum(margins) / max(len(margins), 1),
    }


def preference_shift(tuned_chosen, tuned_rejected, base_chosen, base_rejected) -> dict:
    """How training moved each pair, relative to the base: the implicit reward of DPO, log(pi/pi_base), of
    the chosen answer minus that of the rejected one. Accuracy is the share of pairs moved toward chosen."""
    margins = [
        (tc - bc) - (tr - br) for tc, tr, bc, br in zip(tuned_chosen, tuned_rejected, base_chosen, base_rejected)
    ]
    return {
        "implicit_accuracy": sum(m > 0 for m in margins) / max(len(margins), 1),
        "implicit_margin": sum(margins) / max(len(margins), 1),
    }


def generation_stats(new_tokens: list[int], stopped: list[bool], seconds: float) -> dict:
    """Mean generated length, stop rate (ended with EOS / end-of-turn rather than hitting max_new_tokens), tokens/s."""
    n = max(len(new_tokens), 1)
    return {
        "mean_new_tokens": sum(new_tokens) / n,
        "stop_rate": sum(stopped) / n,
        "tokens_per_s": sum(new_tokens) / seconds if seconds > 0 else None,
    }
