"""LLM-as-judge: pairwise comparison through any OpenAI-compatible chat endpoint (ayar serve included).

Each pair is judged twice with the answers' positions swapped; a win counts only when both orders agree,
otherwise it is a tie. This removes the judge's position bias from the result.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request

from ayar.errors import AyarError

PROMPT = """You are comparing two answers to the same question. Judge helpfulness, correctness and clarity.

Question:
{question}

Answer A:
{a}

Answer B:
{b}

Reply with exactly one word: A, B, or TIE."""


def ask(url: str, model: str, content: str, api_key: str | None = None, timeout: float = 60) -> str:
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 5}
    ).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())["choices"][0]["message"]["content"]
    except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
        raise AyarError(
            f"judge endpoint {url} failed: {e}; check --judge-url (an OpenAI-compatible base URL ending in /v1)"
        ) from None


def verdict(text: str) -> str:
    m = re.search(r"\b(TIE|A|B)\b", text.strip().upper())
    return m.group(1) if m else "TIE"


def pairwise(
    questions: list[str], tuned: list[str], base: list[str], url: str, model: str, api_key_env: str = "OPENAI_API_KEY"
) -> dict:
    api_key = os.environ.get(api_key_env)
    wins = losses = ties = 0
    rows = []
    for q, t, b in zip(questions, tuned, base):
        first = verdict(ask(url, model, PROMPT.format(question=q, a=t, b=b), api_key))  # tuned is A
        second = verdict(ask(url, model, PROMPT.format(question=q, a=b, b=t), api_key))  # tuned is B
        if first == "A" and second == "B":
            outcome, wins = "tuned", wins + 1
        elif first == "B" and second == "A":
            outcome, losses = "base", losses + 1
        else:
            outcome, ties = "tie", ties + 1
        rows.append({"tuned_first": first, "base_first": second, "winner": outcome})
    n = max(len(rows), 1)
    return {"win_rate": wins / n, "loss_rate": losses / n, "tie_rate": ties / n, "judge": model, "rows": rows}
