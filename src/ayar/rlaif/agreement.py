"""Is the judge good enough? It labels pairs people already labelled, in both orders, before hours go into it.

- agreement: the share of pairs where the judge, consistently in both orders, picks the human's choice;
- decisive agreement: the same among the pairs it decided (chance is 0.5);
- position consistency: the share of pairs whose verdict does not flip with the order (the rest are ties);
- first-position rate: the share of all verdicts that named the answer shown first (0.5 without position bias);
- mean P(human choice), where the judge exposes probabilities, and the agreement when both orders'
  probabilities are averaged (RLAIF's position debiasing, `order_rule: average`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ayar.infer.feedback import Feedback, Skipped
from ayar.rlaif import prompts as ask
from ayar.rlaif.constitution import Principle, pick


def agreement(
    pairs: list, judge: Feedback, principles: list[Principle], seed: int = 42, concurrency: int = 4, tick=None
) -> dict:
    """`pairs`: preference Records (data/records.py). Returns the figures above, counts and one row per pair."""
    tick = tick or (lambda n: None)

    def one(item):
        key, rec = item
        principle = pick(principles, seed, key)
        chosen, rejected = rec.chosen[-1]["content"], rec.rejected[-1]["content"]
        try:
            v1 = judge.choose(ask.compare(rec.messages, chosen, rejected, principle))  # human's choice as (A)
            v2 = judge.choose(ask.compare(rec.messages, rejected, chosen, principle))  # ... as (B)
        except Skipped as e:
            return {"where": rec.where, "principle": principle.name, "outcome": "skipped", "reason": e.kind}
        outcome = {("A", "B"): "agree", ("B", "A"): "disagree"}.get((v1.letter, v2.letter), "tie")
        probs = [p for p in (v1.p_a, None if v2.p_a is None else 1 - v2.p_a) if p is not None]
        return {
            "where": rec.where,
            "principle": principle.name,
            "verdicts": [v1.letter, v2.letter],
            "outcome": outcome,
            "p_human": sum(probs) / 2 if len(probs) == 2 else None,
        }

    workers = min(concurrency, getattr(judge, "max_concurrency", None) or concurrency)
    rows = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for row in pool.map(one, enumerate(pairs)):
            rows.append(row)
            tick(1)
    return summarize(rows, judge.name)


def summarize(rows: list[dict], judge: str) -> dict:
    judged = [r for r in rows if r["outcome"] != "skipped"]
    count = {k: sum(r["outcome"] == k for r in rows) for k in ("agree", "disagree", "tie", "skipped")}
    decided = count["agree"] + count["disagree"]
    verdicts = [v for r in judged for v in r["verdicts"]]
    p = [r["p_human"] for r in judged if r.get("p_human") is not None]
    averaged = [x for x in p if x != 0.5]
    n = len(judged)
    return {
        "judge": judge,
        "pairs": len(rows),
        "judged": n,
        **count,
        "agreement": count["agree"] / n if n else None,
        "decisive_agreement": count["agree"] / decided if decided else None,
        "position_consistency": decided / n if n else None,
        "tie_rate": count["tie"] / n if n else None,
        "first_position_rate": sum(v == "A" for v in verdicts) / len(verdicts) if verdicts else None,
        "mean_p_human": sum(p) / len(p) if p else None,
        # order_rule: average (both orders' probabilities averaged): the share that lands on the human's choice
        "averaged_agreement": sum(x > 0.5 for x in averaged) / len(averaged) if averaged else None,
        "skipped_reasons": _reasons(rows),
        "rows": rows,
    }


def _reasons(rows: list[dict]) -> dict:
    out: dict[str, int] = {}
    for r in rows:
        if r["outcome"] == "skipped":
            out[r["reason"]] = out.get(r["reason"], 0) + 1
    return out


def format_report(result: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f} %"

    lines = [
        f"judge {result['judge']}: {result['judged']} of {result['pairs']} pairs judged in both orders"
        + (f" ({result['skipped']} skipped: {result['skipped_reasons']})" if result["skipped"] else ""),
        f"  agreement with the human labels   {pct(result['agreement'])}  ({result['agree']} pairs)",
        f"  among pairs it decided            {pct(result['decisive_agreement'])}  (chance: 50 %)",
        f"  position consistency              {pct(result['position_consistency'])}  "
        f"(tie rate {pct(result['tie_rate'])}: the verdict flipped with the order)",
        f"  verdicts naming the first answer  {pct(result['first_position_rate'])}  (50 % without position bias)",
    ]
    if result["mean_p_human"] is not None:
        lines.append(f"  mean P(human's choice)            {result['mean_p_human']:.3f}")
        lines.append(
            f"  with both orders' probabilities averaged (order_rule: average): {pct(result['averaged_agreement'])}"
        )
    return "\n".join(lines)
