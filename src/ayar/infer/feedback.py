"""A feedback model: asked to critique, revise or choose between two answers (RLAIF, LLM-as-judge). Either any
OpenAI-compatible chat endpoint (`ayar serve` of another run included) or a local model through ayar's engine.

What goes wrong with an endpoint is sorted once, here: rate limits (429), server errors (5xx), timeouts, dropped
connections and answers that are not what was asked for are retried with exponential backoff, then reported as
`Skipped` with their kind, so a caller counts them instead of crashing or recording a wrong label. A wrong URL
or key (401/403/404), or an endpoint that fails every request in a row, stops the work with an error that says
what to check.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from ayar.errors import AyarError

_LETTER = re.compile(r"^\W*(?:option|answer|response)?\W*\(?([AB])\b", re.I)


class Skipped(Exception):
    """One request that failed after its retries: `kind` is rate_limited, server_error, timeout, connection or
    malformed."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass
class Choice:
    """A verdict between options A and B: the letter, P(A) when the feedback model exposes its probabilities
    (local models; endpoints returning logprobs), and the raw reply."""

    letter: str
    p_a: float | None
    raw: str


class Feedback(Protocol):
    name: str  # what the provenance records as the judge
    max_concurrency: int | None  # requests it takes at once (None: as many as configured)

    def ask(self, prompt: str, max_tokens: int) -> str:
        """A free-text answer (a critique, a revision); raises Skipped."""

    def choose(self, prompt: str) -> Choice:
        """A or B for a prompt that asks for one letter; raises Skipped."""


def parse_letter(text: str) -> str | None:
    """The A or B a reply starts with (`A`, `(B)`, `Answer: A.`, `Option B`), else None."""
    m = _LETTER.match(text or "")
    return m.group(1).upper() if m else None


class EndpointFeedback:
    """An OpenAI-compatible chat endpoint (`url` ends in /v1). `backoff`: the first retry's wait in seconds,
    doubled each time. `give_up_after`: this many failed requests in a row stop the work (a dead endpoint)."""

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        give_up_after: int = 20,
        logprobs: bool = True,
    ):
        import httpx

        self.url, self.model, self.name = url.rstrip("/"), model, f"{model} @ {url}"
        self.max_concurrency = None
        self.retries, self.backoff, self.give_up_after = retries, backoff, give_up_after
        self.logprobs = logprobs  # asked for; turned off for good when the endpoint refuses it (ayar serve does)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)
        self._failures_in_a_row = 0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> EndpointFeedback:
        """From a JudgeConfig (config/schema.py): the key is read from the environment variable it names."""
        return cls(
            settings.url,
            settings.model,
            os.environ.get(settings.key_env) if settings.key_env else None,
            settings.timeout,
            settings.retries,
            settings.backoff,
        )

    def ask(self, prompt: str, max_tokens: int) -> str:
        def parse(body: dict) -> str:
            text = body["choices"][0]["message"]["content"]
            if not isinstance(text, str) or not text.strip():
                raise ValueError("an empty answer")
            return text.strip()

        return self._call(prompt, max_tokens, parse, logprobs=False)

    def choose(self, prompt: str) -> Choice:
        def parse(body: dict) -> Choice:
            choice = body["choices"][0]
            text = choice["message"]["content"] or ""
            letter = parse_letter(text)
            if letter is None:
                raise ValueError(f"not A or B: {text[:80]!r}")
            return Choice(letter, _p_a(choice.get("logprobs")), text)

        return self._call(prompt, 4, parse, logprobs=self.logprobs)

    def close(self) -> None:
        self._client.close()

    def _call(self, prompt: str, max_tokens: int, parse, logprobs: bool):
        import httpx

        problem = ("connection", "")
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            body = {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "max_tokens": max_tokens,
            }
            if logprobs and self.logprobs:
                body |= {"logprobs": True, "top_logprobs": 5}
            try:
                resp = self._client.post(f"{self.url}/chat/completions", json=body)
            except httpx.TimeoutException as e:
                problem = ("timeout", str(e) or "no answer in time")
                continue
            except httpx.HTTPError as e:
                problem = ("connection", f"{type(e).__name__}: {e}")
                continue
            if resp.status_code == 400 and body.get("logprobs") and "logprobs" in resp.text:
                self.logprobs = False  # the endpoint has no logprobs: ask without, at once
                return self._call(prompt, max_tokens, parse, logprobs=False)
            if resp.status_code in (401, 403, 404):
                raise AyarError(
                    f"the judge endpoint {self.url} answered {resp.status_code} ({resp.text[:160]}): check the URL "
                    "(an OpenAI-compatible base URL ending in /v1), the model name and the API key's variable"
                )
            if resp.status_code == 429 or resp.status_code >= 500:
                problem = ("rate_limited" if resp.status_code == 429 else "server_error", f"HTTP {resp.status_code}")
                continue
            if resp.status_code != 200:
                problem = ("malformed", f"HTTP {resp.status_code}: {resp.text[:160]}")
                continue
            try:
                result = parse(resp.json())
            except (ValueError, KeyError, IndexError, TypeError) as e:
                problem = ("malformed", str(e)[:160])
                continue
            with self._lock:
                self._failures_in_a_row = 0
            return result
        with self._lock:
            self._failures_in_a_row += 1
            dead = self._failures_in_a_row >= self.give_up_after
        if dead:
            raise AyarError(
                f"the judge endpoint {self.url} failed {self.give_up_after} requests in a row (last: {problem[0]}, "
                f"{problem[1]}): is it running? Rerun the same command to continue where this stopped."
            )
        raise Skipped(*problem)


def _p_a(logprobs) -> float | None:
    """P(A) / (P(A) + P(B)) from the first answer token's top logprobs, where the endpoint returned them."""
    try:
        top = logprobs["content"][0]["top_logprobs"]
    except (TypeError, KeyError, IndexError):
        return None
    p = {"A": 0.0, "B": 0.0}
    for entry in top:
        letter = parse_letter(entry.get("token", ""))
        if letter and entry.get("token", "").strip().strip("(").upper() == letter:
            p[letter] += math.exp(entry["logprob"])
    total = p["A"] + p["B"]
    return p["A"] / total if total > 0 else None


class EngineFeedback:
    """A local model or run directory as the feedback model, through ayar's engine. Its choice reads the
    probabilities of the tokens `A` and `B` as the answer's first token (no sampling, a soft label for free)."""

    max_concurrency = 1  # one model in this process: requests in turn

    def __init__(self, engine, name: str | None = None, batch_size: int = 8):
        self.engine, self.name, self.batch_size = engine, name or str(engine.source), batch_size
        self._letters = {letter: self._token_ids(letter) for letter in "AB"}

    def _token_ids(self, letter: str) -> list[int]:
        tok = self.engine.tok
        ids = {i for text in (letter, " " + letter) for i in tok.encode(text, add_special_tokens=False)[:1]}
        return sorted(ids)

    def ask(self, prompt: str, max_tokens: int) -> str:
        text = self.engine.generate(prompt, max_new_tokens=max_tokens, preset="deterministic").text.strip()
        if not text:
            raise Skipped("malformed", "an empty answer")
        return text

    def choose(self, prompt: str) -> Choice:
        import torch

        ids = self.engine.prompt_ids([{"role": "user", "content": prompt}])
        with torch.no_grad():
            last = self.engine.logprobs(ids)[-1].float()
        p = {k: torch.logsumexp(last[v], 0).exp().item() for k, v in self._letters.items()}
        p_a = p["A"] / (p["A"] + p["B"])
        return Choice("A" if p_a >= 0.5 else "B", p_a, f"P(A)={p_a:.3f}")
