"""Record -> token ids + labels. The one place where label masks are decided.

Chat records: the conversation is rendered once with the model's own chat template and tokenized once;
the character spans of assistant turns are found by rendering growing prefixes of the conversation, and
a token is trained iff it overlaps an assistant span. Every assistant span ends with an end-of-turn /
EOS token (added when the template does not), so the tuned model learns to stop. Text records (continued
pretraining) train on every token.
"""

from __future__ import annotations

from dataclasses import dataclass

from ayar.data.records import Record
from ayar.errors import DataError

IGNORE = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str
    truncated: bool = False
    full_length: int = 0  # tokens before truncation

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


class Renderer:
    """Renders conversations for one tokenizer and data config."""

    def __init__(
        self,
        tokenizer,
        template: str = "chat",
        max_length: int = 1024,
        train_on_prompt: bool = False,
        system_prompt: str | None = None,
    ):
        self.tok = tokenizer
        self.template = template
        self.max_length = max_length
        self.train_on_prompt = train_on_prompt
        self.system_prompt = system_prompt
        if tokenizer.eos_token is None:
            raise DataError(
                "the tokenizer has no EOS token, so the model could not learn to stop; set one on the tokenizer"
            )
        if template == "chat" and not tokenizer.chat_template:
            raise DataError(
                "this model's tokenizer has no chat template (a base model?): set data.template: alpaca, "
                "or use a model with a chat template"
            )
        self.stop_strings = end_of_turn_strings(tokenizer)

    @classmethod
    def from_config(cls, tokenizer, data_cfg) -> "Renderer":
        """The renderer a DataConfig describes (training, `ayar data`)."""
        return cls(tokenizer, data_cfg.template, data_cfg.max_length, data_cfg.train_on_prompt, data_cfg.system_prompt)

    def text_and_spans(self, rec: Record) -> tuple[str, list[tuple[int, int]]]:
        """The full training text and the (start, end) character spans that are trained."""
        if rec.kind == "text":
            text = rec.text + self.tok.eos_token
            return text, [(0, len(text))]
        messages = self._with_system(rec.conversation())
        if self.template == "alpaca":
            return self._alpaca(messages, rec.where)
        render = lambda msgs, gen: self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        full = render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render(messages[:i], True)
            upto = render(messages[: i + 1], False)
            if not (full.startswith(before) and full.startswith(upto) and upto.startswith(before)):
                raise DataError(
                    f"{rec.where}: the chat template renders turn {i} differently depending on what follows "
                    "(not prefix-stable), so assistant tokens cannot be located; use data.template: alpaca or "
                    "another template"
                )
            end = len(upto.rstrip())
            spans.append([len(before), end])
        full = self._ensure_eos(full, spans)
        if self.train_on_prompt:
            spans = [(0, len(full))]
        return full, [tuple(s) for s in spans]

    def encode(self, rec: Record) -> Example:
        """Tokens and labels, truncated to max_length; rows with nothing to train are returned, not refused
        (lint reports them with their reason)."""
        text, spans = self.text_and_spans(rec)
        # Chat templates write their own special tokens; for text templates the tokenizer adds BOS as it does at
        # inference.
        plain = self.template == "alpaca" or rec.kind == "text"
        enc = self.tok(text, add_special_tokens=plain, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = _label(ids, offsets, spans)
        truncated = len(ids) > self.max_length
        return Example(ids[: self.max_length], labels[: self.max_length], rec.where, truncated, len(ids))

    def render(self, rec: Record) -> Example:
        """`encode`, refusing a row with nothing to train (an error naming the row and why)."""
        ex = self.encode(rec)
        truncated = ex.truncated
        if ex.n_trained == 0:
            why = (
                (
                    f"after truncation to data.max_length={self.max_length} (the row has more tokens than that); "
                    "raise data.max_length or shorten the prompt"
                )
                if truncated
                else "the assistant answer is empty"
            )
            raise DataError(f"{rec.where}: no token of this row would be trained: {why}")
        return ex

    def prompt_text(self, messages: list[dict]) -> str:
        """The text the model sees before generating its answer to `messages` (inference)."""
        messages = self._with_system(messages)
        if self.template == "alpaca":
            return ALPACA_PROMPT.format(instruction=_alpaca_instruction(messages, "prompt"))
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def trl_prompt(self, messages: list[dict], where: str = "prompt"):
        """The prompt as TRL's trainers take it: the messages with the run's system prompt for chat templates
        (TRL renders them with this same tokenizer template), the rendered text for the alpaca template."""
        messages = self._with_system(messages)
        if self.template == "alpaca":
            return ALPACA_PROMPT.format(instruction=_alpaca_instruction(messages, where))
        return messages

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system_prompt}] + list(messages)
        return list(messages)

    def _alpaca(self, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        answer = messages[-1]
        if answer["role"] != "assistant":
            raise DataError(f"{where}: the alpaca template needs the conversation to end with an assistant answer")
        prompt = ALPACA_PROMPT.format(instruction=_alpaca_instruction(messages[:-1], where))
        text = prompt + answer["content"] + self.tok.eos_token
        spans = [(0, len(text))] if self.train_on_prompt else [(len(prompt), len(text))]
        return text, spans

    def _ensure_eos(self, full: str, spans: list[list[int]]) -> str:
        """Insert EOS after every assistant span that does not already end with an end-of-turn token."""
        shift = 0
        for span in spans:
            span[0] += shift
            span[1] += shift
            if not any(full[: span[1]].endswith(s) for s in self.stop_strings):
                full = full[: span[1]] + self.tok.eos_token + full[span[1] :]
                span[1] += len(self.tok.eos_token)
                shift += len(self.tok.eos_token)
        return full


def _label(ids: list[int], offsets: list, spans: list[tuple[int, int]]) -> list[int]:
    labels = []
    for tid, (s, e) in zip(ids, offsets):
        trained = any(s < b and e > a for a, b in spans) if e > s else False
        labels.append(tid if trained else IGNORE)
    return labels


def _alpaca_instruction(messages: list[dict], where: str) -> str:
    users = [m for m in messages if m["role"] == "user"]
    if len(users) != 1 or any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where}: the alpaca template supports single-turn rows only; use data.template: chat for multi-turn data"
        )
    system = [m["content"] for m in messages if m["role"] == "system"]
    return "\n\n".join(system + [users[0]["content"]])


# End-of-turn tokens of common chat templates (ChatML, Llama 3, Phi-3, Gemma, Llama 2/Mistral, GPT-style).
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


def end_of_turn_strings(tokenizer) -> list[str]:
    """Token strings that end an assistant turn: EOS plus the known end-of-turn tokens this vocabulary has."""
    vocab = tokenizer.get_vocab()
    strings = {tokenizer.eos_token} | {name for name in _END_OF_TURN if name in vocab}
    return sorted(s for s in strings if s)


def stop_token_ids(tokenizer, model=None) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.eos_token_id is not None:
        ids.update(gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
    for s in end_of_turn_strings(tokenizer):
        ids.add(tokenizer.convert_tokens_to_ids(s))
    return sorted(i for i in ids if i is not None)
