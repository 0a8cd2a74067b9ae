"""LLM-as-judge: pairwise comparison through any OpenAI-compatible chat endpoint (ayar serve included).

Each pair is judged twice with the answers' positions swapped; a win counts only when both orders agree,
otherwise it is a tie. This removes the judge's position bias from the result.
"""

from __future__ import annotations

import os
import re

from ayar.errors import AyarError
from ayar.infer.feedback import EndpointFeedback, Skipped

PROMPT = """You are comparing two answers to the same question. Judge helpfulness, correctness and clarity.

Question:
{question}

Answer A:
{a}

Answer B:
{b}

Reply with exactly one word: A, B, or TIE."""


def verdict(text: str) -> str:
    m = re.search(r"\b(TIE|A|B)\b", text.strip().upper())
    return m.group(1) if m else "TIE"


def pairwise(
    questions: list[str], tuned: list[str], base: list[str], url: str, model: str, api_key_env: str = "OPENAI_API_KEY"
) -> dict:
    """Win, loss and tie rates of tuned against base. The endpoint client (infer/feedback.py) retries rate
    limits, server errors and timeouts; a pair it still could not judge is counted as skipped, and an endpoint
    that judged nothing is an error."""
    judge = EndpointFeedback(url, model, os.environ.get(api_key_env), retries=2, backoff=0.5)
    wins = losses = ties = 0
    rows, problem = [], None
    try:
        for q, t, b in zip(questions, tuned, base):
            try:
                first = verdict(judge.ask(PROMPT.format(question=q, a=t, b=b), 5))  # tuned is A
                second = verdict(judge.ask(PROMPT.format(question=q, a=b, b=t), 5))  # tuned is B
            except Skipped as e:
                problem = e
                rows.append({"winner": "skipped", "reason": e.kind})
                continue
            if first == "A" and second == "B":
                outcome, wins = "tuned", wins + 1
            elif first == "B" and second == "A":
                outcome, losses = "base", losses + 1
            else:
                outcome, ties = "tie", ties + 1
            rows.append({"tuned_first": first, "base_first": second, "winner": outcome})
    finally:
        judge.close()
    n = wins + losses + ties
    if rows and not n:
        raise AyarError(
            f"the judge endpoint {url} failed on every pair ({problem}); check --judge-url (an OpenAI-compatible "
            "base URL ending in /v1) and that it is running"
        )
    n = max(n, 1)
    return {
        "win_rate": wins / n,
        "loss_rate": losses / n,
        "tie_rate": ties / n,
        "skipped": len(rows) - wins - losses - ties,
        "judge": model,
        "rows": rows,
    }
