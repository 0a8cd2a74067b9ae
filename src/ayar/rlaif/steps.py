"""The two data steps of the loop, each resumable through its RowLog.

- synthesize (SL-CAI): the policy answers each prompt; under a sampled principle the feedback model critiques
  the answer and writes a revision. Rows `{id, prompt, answer, critique, revision, principle}`.
- label (RLAIF): the policy samples two answers per prompt; the feedback model picks the better one under a
  sampled principle, asked in both orders. A verdict that flips with the order is a tie and is dropped. Rows
  in ayar's preference format with their provenance (principle, judge, both verdicts, confidence).

Prompts are taken in fixed blocks of `batch_size`: a block is generated as a whole (seeded by its index) even
when part of it is done, so a resumed run samples exactly what the uninterrupted run would have.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ayar.infer.feedback import Feedback, Skipped
from ayar.rlaif import prompts as ask
from ayar.rlaif.constitution import Principle, pick
from ayar.rlaif.rowlog import RowLog


@dataclass
class Settings:
    seed: int = 42
    batch_size: int = 8
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    judge_tokens: int = 256
    concurrency: int = 4
    min_confidence: float = 0.0
    order_rule: str = "strict"  # strict: both orders' letters must agree; average: the mean of their probabilities


def synthesize(prompts: list[list[dict]], policy, judge: Feedback, principles, log: RowLog, s: Settings, tick) -> None:
    def one(key: int, answer: str) -> dict:
        principle = pick(principles, s.seed, key)
        critique = judge.ask(ask.critique(prompts[key], answer, principle), s.judge_tokens)
        revision = judge.ask(ask.revision(prompts[key], answer, critique, principle), s.judge_tokens)
        return {
            "id": key,
            "prompt": prompts[key],
            "answer": answer,
            "critique": critique,
            "revision": revision,
            "principle": principle.name,
            "judge": judge.name,
        }

    for keys in _blocks(prompts, s.batch_size, log, tick):
        replies = policy.generate_batch(
            [prompts[k] for k in keys], s.batch_size, max_new_tokens=s.max_new_tokens, preset="deterministic"
        )
        todo = [(k, r.text) for k, r in zip(keys, replies) if k not in log.done()]
        _judge_all(todo, one, prompts, judge, log, s, tick)


def label(prompts: list[list[dict]], policy, judge: Feedback, principles, log: RowLog, s: Settings, tick) -> None:
    import torch

    def one(key: int, answers: tuple[str, str]) -> dict:
        first, second = answers
        if first.strip() == second.strip():
            raise Skipped("identical", "the two samples are the same answer")
        principle: Principle = pick(principles, s.seed, key)
        v1 = judge.choose(ask.compare(prompts[key], first, second, principle))  # the first sample as (A)
        v2 = judge.choose(ask.compare(prompts[key], second, first, principle))  # ... and as (B)
        # P(first sample is better), from each order's probabilities where the judge exposes them
        probs = [p for p in (v1.p_a, None if v2.p_a is None else 1 - v2.p_a) if p is not None]
        p_first = sum(probs) / len(probs) if len(probs) == 2 else None
        if s.order_rule == "average" and p_first is not None:  # RLAIF's debiasing: average the two orders
            if abs(p_first - 0.5) < 1e-6:  # no preference once position is averaged out
                raise Skipped("tie", "the two orders' probabilities average to 0.5")
            first_wins = p_first > 0.5
        elif (v1.letter, v2.letter) in (("A", "B"), ("B", "A")):
            first_wins = v1.letter == "A"
        else:
            raise Skipped("tie", f"the verdict follows the position: {v1.letter} then {v2.letter}")
        chosen, rejected = (first, second) if first_wins else (second, first)
        confidence = None if p_first is None else (p_first if first_wins else 1 - p_first)
        if confidence is not None and confidence < s.min_confidence:
            raise Skipped("low_confidence", f"confidence {confidence:.3f} < {s.min_confidence}")
        return {
            "id": key,
            "prompt": prompts[key],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "provenance": {
                "principle": principle.name,
                "judge": judge.name,
                "verdicts": [v1.letter, v2.letter],  # first sample shown as (A), then as (B)
                "confidence": None if confidence is None else round(confidence, 4),
            },
        }

    for keys in _blocks(prompts, s.batch_size, log, tick):
        conversations = [prompts[k] for k in keys]
        samples = []
        for n in range(2):
            torch.manual_seed(s.seed * 1_000_003 + keys[0] * 2 + n)  # by block: the same samples after a resume
            samples.append(
                policy.generate_batch(
                    conversations,
                    s.batch_size,
                    max_new_tokens=s.max_new_tokens,
                    preset="creative",
                    temperature=s.temperature,
                    top_p=s.top_p,
                )
            )
        todo = [(k, (a.text, b.text)) for k, a, b in zip(keys, *samples) if k not in log.done()]
        _judge_all(todo, one, prompts, judge, log, s, tick)


def _blocks(prompts: list, size: int, log: RowLog, tick):
    """The blocks of prompt indices with work left (the progress bar starts at what is done)."""
    log.check_prompts(prompts)
    done = log.done()
    n = len(prompts)
    tick(len([k for k in range(n) if k in done]))
    for start in range(0, n, size):
        keys = list(range(start, min(start + size, n)))
        if not all(k in done for k in keys):
            yield keys


def _judge_all(todo: list, one, prompts, judge: Feedback, log: RowLog, s: Settings, tick) -> None:
    """Ask the feedback model about each item (several requests in flight for an endpoint) and record the rows
    in order; a Skipped item is recorded with its reason."""
    workers = min(s.concurrency, getattr(judge, "max_concurrency", None) or s.concurrency)

    def attempt(item):
        try:
            return one(*item), None
        except Skipped as e:
            return None, e

    with ThreadPoolExecutor(max(1, min(workers, len(todo) or 1))) as pool:
        for (key, _), (row, skipped) in zip(todo, pool.map(attempt, todo)):
            if row is not None:
                log.add(row)
            else:
                log.skip(key, prompts[key], skipped.kind, skipped.detail)
            tick(1)
