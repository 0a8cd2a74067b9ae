"""The transformers backend: one base model in memory, LoRA adapters chosen per row of a batch.

A batch runs through `model.generate` (its KV cache and sampling) with left padding. peft's mixed-batch
inference (`adapter_names=`) lets rows of one batch use different adapters, or none ("__base__"). A
streamer sees every new token of every row: it decodes each row's text incrementally, applies stop
strings, and tells the row when it is done; a stopping criterion reads those flags, so a row that hit a
stop string or whose client went away stops costing compute at the next step.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ayar.errors import AyarError

BASE = "base"  # the public name of the base model (adapters off)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Sampling:
    """Rows batch together only when they sample alike (one logits pipeline per `generate` call)."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


@dataclass
class Row:
    """One sequence to generate. `on_delta(text)` gets new text; `on_finish(reason, n_tokens)` is called once."""
    prompt_ids: list[int]
    max_tokens: int
    model: str = BASE
    stop: tuple[str, ...] = ()
    on_delta: Callable[[str], None] = lambda text: None
    on_finish: Callable[[str, int], None] = lambda reason, n: None
    cancelled: Callable[[], bool] = lambda: False
    ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (cut at a stop string)
    emitted: int = 0  # characters of `text` already sent
    finish: str | None = None


def valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and ".." not in name and name != BASE


class HFBackend:
    kind = "transformers"

    def __init__(self, engine, name: str):
        self.engine, self.tok, self.model = engine, engine.tok, engine.model
        self.renderer, self.stop_ids = engine.renderer, set(engine.stop_ids)
        self.lock = threading.Lock()  # generate vs. adapter load/unload
        self.adapters: dict[str, str] = {}  # public name -> peft adapter name
        if hasattr(self.model, "peft_config"):
            self.adapters[name] = self.model.active_adapter
        self.default_model = name if name in self.adapters else BASE
        self.context_window = int(getattr(self._base().config, "max_position_embeddings", 0) or 2048)

    # --- models -----------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return [BASE, *self.adapters]

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a LoRA adapter (a run directory or an adapter folder) under `name`; safetensors only."""
        from peft import PeftModel

        folder = adapter_folder(path)
        with self.lock:
            if name in self.adapters:
                raise AyarError(f"an adapter named {name!r} is already loaded: unload it first or pick another name")
            if hasattr(self.model, "peft_config"):
                self.model.load_adapter(str(folder), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name)
                self.model.eval()
            self.adapters[name] = name

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise KeyError(name)
            self.model.delete_adapter(self.adapters.pop(name))

    # --- tokens -----------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.renderer.prompt_text(messages)
        return self.tok(text, add_special_tokens=self.renderer.template == "alpaca")["input_ids"]

    def encode_text(self, prompt: str) -> list[int]:
        return self.tok(prompt)["input_ids"]

    # --- generation -------------------------------------------------------------------------------
    def run(self, rows: list[Row], sampling: Sampling) -> None:
        """Generate every row to its end; rows report through their callbacks."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        for r in rows:  # its adapter was unloaded while the request waited
            if r.model != BASE and r.model not in self.adapters:
                r.finish = "unloaded"
                r.on_finish("unloaded", 0)
        rows = [r for r in rows if r.finish is None]
        if not rows:
            return
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else min(self.stop_ids)
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's next token is at the same position
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        streamer = _RowStreamer(self, rows)

        class Done(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                for r in rows:
                    if r.finish is None and r.cancelled():
                        streamer.close(r, "cancelled")
                return torch.tensor([r.finish is not None for r in rows], device=input_ids.device)

        kw = dict(sampling.kwargs(), max_new_tokens=max(r.max_tokens for r in rows), eos_token_id=sorted(self.stop_ids),
                  pad_token_id=pad, streamer=streamer, stopping_criteria=StoppingCriteriaList([Done()]))
        with self.lock, torch.no_grad(), self._adapters_for(rows, kw):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            device = self.engine.device
            self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)
        for r in rows:  # generation ended (all rows done, or the longest budget reached)
            if r.finish is None:
                streamer.close(r, "length")

    def _adapters_for(self, rows: list[Row], kw: dict):
        """One adapter (or none) for the whole batch runs at full speed; rows that differ use peft's
        mixed-batch path, which splits each layer's LoRA work by adapter."""
        import contextlib

        if not hasattr(self.model, "peft_config"):
            return contextlib.nullcontext()
        names = {self.adapters.get(r.model, "__base__") for r in rows}
        if names == {"__base__"}:
            return self.model.disable_adapter()
        if len(names) == 1:
            self.model.set_adapter(names.pop())
            return contextlib.nullcontext()
        kw["adapter_names"] = [self.adapters.get(r.model, "__base__") for r in rows]
        return contextlib.nullcontext()

    def _base(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model


class _RowStreamer:
    """transformers' streamer protocol (`put`, `end`) for a batch: routes each step's tokens to their rows."""

    def __init__(self, backend: HFBackend, rows: list[Row]):
        self.b, self.rows, self.prompt_seen = backend, rows, False
        self.longest_stop = max((len(s) for r in rows for s in r.stop), default=0)

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for r, token in zip(self.rows, value.view(-1).tolist()):
            if r.finish is not None:
                continue
            if token in self.b.stop_ids:
                self.close(r, "stop")
                continue
            r.ids.append(token)
            text = r.text = self.b.tok.decode(r.ids, skip_special_tokens=True)
            cut = _first_stop(text, r.stop, max(0, r.emitted - self.longest_stop))
            if cut is not None:
                r.text = text[:cut]
                self.close(r, "stop")
                continue
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                if len(r.ids) >= r.max_tokens:
                    self.close(r, "length")
                continue
            safe = len(text) - _stop_prefix(text, r.stop)  # hold back what may be the start of a stop string
            if safe > r.emitted:
                r.on_delta(text[r.emitted:safe])
                r.emitted = safe
            if len(r.ids) >= r.max_tokens:
                self.close(r, "length")

    def end(self) -> None:
        pass

    def close(self, row: Row, reason: str) -> None:
        if len(row.text) > row.emitted and reason != "cancelled":  # text held back (a partial character, a stop cut)
            row.on_delta(row.text[row.emitted:])
            row.emitted = len(row.text)
        row.finish = reason
        row.on_finish(reason, len(row.ids))


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins one of `stops`."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)


def adapter_folder(path: str | Path) -> Path:
    """The adapter folder of a run directory or an adapter folder; refuses pickle-format weights."""
    path = Path(path)
    folder = path / "adapter" if (path / "run.json").is_file() else path
    if not (folder / "adapter_config.json").is_file():
        raise AyarError(f"{path} is not a LoRA adapter folder or ayar run directory (no adapter_config.json)")
    if not (folder / "adapter_model.safetensors").is_file():
        raise AyarError(f"{folder} has no adapter_model.safetensors: only safetensors adapters are loaded "
                        "(pickle files can run code); convert it with peft's save_pretrained(safe_serialization=True)")
    return folder
