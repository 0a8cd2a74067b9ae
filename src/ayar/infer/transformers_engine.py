"""The transformers runtime: a run directory (base + adapter, or a full fine-tune) or a plain model directory,
loaded with transformers + peft, answering through the Engine protocol (infer/base.py)."""

from __future__ import annotations

import threading
from typing import Iterator

import torch

from ayar.config import GenerationConfig
from ayar.data.render import Renderer, stop_token_ids
from ayar.infer.base import Reply, as_messages
from ayar.infer.presets import generation_kwargs


class TransformersEngine:
    kind = "transformers"

    def __init__(self, model, tokenizer, renderer: Renderer, generation: GenerationConfig, device: str, source: str):
        self.model, self.tok, self.renderer = model, tokenizer, renderer
        self.generation, self.device, self.source = generation, device, source
        self.stop_ids = stop_token_ids(tokenizer, getattr(model, "get_base_model", lambda: model)())
        self.last: Reply | None = None  # the full reply of the latest `stream` call
        self.full_finetune = False  # a `method: full` run: the weights are the tuned model (no adapter to disable)

    def stream(self, messages: list[dict] | str, **overrides) -> Iterator[str]:
        """Yield text pieces as they are generated; the final Reply is available as `self.last`."""
        from transformers import TextIteratorStreamer

        inputs = self._encode(messages)
        kw = self._kwargs(overrides)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        result = {}

        def work():
            with torch.no_grad():
                result["out"] = self.model.generate(**inputs, **kw, streamer=streamer)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            yield piece
        thread.join()
        self.last = self._reply(result["out"][0, inputs["input_ids"].shape[1] :], "".join(pieces))

    def generate(self, messages: list[dict] | str, **overrides) -> Reply:
        inputs = self._encode(messages)
        kw = self._kwargs(overrides)
        with torch.no_grad():
            out = self.model.generate(**inputs, **kw)
        new = out[0, inputs["input_ids"].shape[1] :]
        return self._reply(new, self.tok.decode(new, skip_special_tokens=True))

    def generate_batch(self, conversations: list[list[dict]], batch_size: int = 8, **overrides) -> list[Reply]:
        """Answers to many conversations: batched with left padding (rows of similar length together, to
        waste little on padding), KV cache on; replies come back in input order."""
        texts = [self.renderer.prompt_text(m) for m in conversations]
        kw = self._kwargs(overrides)
        replies: list[Reply | None] = [None] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        side, self.tok.padding_side = self.tok.padding_side, "left"
        try:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                enc = self.tok(
                    [texts[i] for i in chunk],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=self.renderer.template == "alpaca",
                )
                enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                with torch.no_grad():
                    out = self.model.generate(**enc, **kw)
                for row, i in zip(out[:, enc["input_ids"].shape[1] :].tolist(), chunk):
                    end = next((j + 1 for j, t in enumerate(row) if t in self.stop_ids), len(row))
                    row = row[:end]  # finished rows are padded to the batch's longest; cut at the stop token
                    replies[i] = self._reply(torch.tensor(row), self.tok.decode(row, skip_special_tokens=True))
        finally:
            self.tok.padding_side = side
        return replies

    def base_model(self):
        """A context in which the model answers without its adapter (the base model), without a second copy."""
        import contextlib

        disable = getattr(self.model, "disable_adapter", None)
        return disable() if disable is not None else contextlib.nullcontext()

    def prompt_ids(self, messages: list[dict] | str) -> list[int]:
        """The prompt as training rendered it (the run's template, system prompt and special tokens)."""
        text = self.renderer.prompt_text(as_messages(messages))
        return self.tok(text, add_special_tokens=self.renderer.template == "alpaca")["input_ids"]

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = self.model.generate(
                input_ids=torch.tensor([ids]).to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=sorted(self.stop_ids),
                pad_token_id=self.tok.pad_token_id,
            )
        return out[0, len(ids) :].tolist()

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids]).to(self.device)).logits[0]
        return torch.log_softmax(logits.float().cpu(), -1)

    def token_name(self, i: int) -> str:
        return self.tok.convert_ids_to_tokens(i)

    def _encode(self, messages: list[dict] | str) -> dict:
        text = self.renderer.prompt_text(as_messages(messages))
        add_special = self.renderer.template == "alpaca"
        enc = self.tok(text, return_tensors="pt", add_special_tokens=add_special)
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def _kwargs(self, overrides: dict) -> dict:
        gen = GenerationConfig(**{**self.generation.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
        kw = generation_kwargs(gen)
        kw["eos_token_id"] = self.stop_ids
        kw["pad_token_id"] = self.tok.pad_token_id
        return kw

    def _reply(self, new_ids, text: str) -> Reply:
        ids = new_ids.tolist()
        stopped = bool(ids) and ids[-1] in self.stop_ids
        return Reply(text=text.strip(), stopped=stopped, new_tokens=len(ids))
