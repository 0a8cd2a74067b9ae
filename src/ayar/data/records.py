"""The one internal form every data format maps to: a Record.

A Record is a chat (messages), a preference pair (prompt messages + chosen/rejected continuations), a
plain text (continued pretraining), or a labelled text (classification). Everything after the format
converters (render, lint, clean, stats, convert, cache) works on Records only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

KINDS = ("chat", "preference", "text", "classification")


@dataclass
class Record:
    messages: list[dict] = field(default_factory=list)  # chat: the conversation; preference: the prompt turns
    where: str = ""  # "file:line" or "file[index]", for messages that point at the row
    chosen: list[dict] | None = None  # preference: the preferred assistant turn(s)
    rejected: list[dict] | None = None  # preference: the dispreferred assistant turn(s)
    text: str | None = None  # text / classification
    label: str | None = None  # classification

    @property
    def kind(self) -> str:
        if self.chosen is not None:
            return "preference"
        if self.label is not None:
            return "classification"
        if self.text is not None:
            return "text"
        return "chat"

    def conversation(self) -> list[dict]:
        """The messages an SFT run trains on: preference -> prompt + chosen, classification -> text -> label."""
        if self.kind == "preference":
            return self.messages + self.chosen
        if self.kind == "classification":
            return [{"role": "user", "content": self.text}, {"role": "assistant", "content": self.label}]
        return self.messages

    def prompt_and_reference(self) -> tuple[list[dict], str]:
        """What the model is asked and the answer to compare its own against (GRPO's rewards): the conversation
        without its last turn and that turn's text when an assistant spoke last (and said something), else the
        whole conversation and ""."""
        messages = self.conversation()
        reference = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
        return (messages[:-1] if reference else messages), reference

    def payload(self) -> dict:
        """The content without the location: what dedup, leakage checks and the tokenization cache compare."""
        return {
            k: v
            for k, v in (
                ("messages", self.messages),
                ("chosen", self.chosen),
                ("rejected", self.rejected),
                ("text", self.text),
                ("label", self.label),
            )
            if v not in (None, [])
        }

    def strings(self) -> list[str]:
        """Every free-text field, in order (for PII scrubbing, stats and language detection)."""
        out = [m["content"] for m in self.messages]
        for turns in (self.chosen, self.rejected):
            out += [m["content"] for m in turns or []]
        if self.text is not None:
            out.append(self.text)
        return out

    def map_strings(self, fn) -> Record:
        """A copy with `fn` applied to every free-text field (labels and roles untouched)."""
        turns = lambda ms: None if ms is None else [{**m, "content": fn(m["content"])} for m in ms]
        return Record(
            turns(self.messages),
            self.where,
            turns(self.chosen),
            turns(self.rejected),
            None if self.text is None else fn(self.text),
            self.label,
        )


def content_hash(items) -> str:
    """A stable hash of records' content (order matters, locations do not)."""
    h = hashlib.sha256()
    for r in items:
        h.update(json.dumps(r.payload(), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()
