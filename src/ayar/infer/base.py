"""What every inference runtime offers: the `Engine` protocol, and the `Reply` it returns.

One runtime per module: transformers (transformers_engine.py: a run directory or model directory, with
adapters), onnxruntime-genai (onnx_engine.py) and llama.cpp (gguf_engine.py), the last two over exported
artifacts (exported.py). `load.py` picks the runtime for a path. `ayar chat`, `ayar eval`, the release gate
(exports/gate.py) and the server's backends (serve/) use engines through this protocol only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable


@dataclass
class Reply:
    text: str
    stopped: bool  # ended with EOS / end-of-turn, not by exhausting max_new_tokens
    new_tokens: int


@runtime_checkable
class Engine(Protocol):
    source: str
    device: str
    generation: object  # GenerationConfig: the defaults a call's overrides start from
    stop_ids: list[int] | set[int]  # token ids that end an answer
    last: Reply | None  # the full reply of the latest `stream` call

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation rendered as this runtime's model sees it, ready for the answer."""

    def stream(self, messages: list[dict] | str, **overrides) -> Iterator[str]:
        """Text pieces as they are generated; then `last` holds the whole Reply."""

    def generate(self, messages: list[dict] | str, **overrides) -> Reply: ...

    def generate_batch(self, conversations: list, batch_size: int = 8, **overrides) -> list[Reply]:
        """Answers in input order."""

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy new token ids after `ids`, up to and including a stop token."""

    def logprobs(self, ids: list[int]):
        """Log-probabilities [len(ids), vocab] of each next token, teacher-forced on `ids` (a torch tensor)."""

    def token_name(self, i: int) -> str: ...


def as_messages(messages: list[dict] | str) -> list[dict]:
    """A bare prompt is one user message."""
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
