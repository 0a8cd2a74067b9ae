"""The transformers backend: one base model in memory, LoRA adapters chosen per row, continuous batching.

Requests join and leave the running batch between decoding steps (continuous batching): a new request
is prefilled and its KV cache merged into the batch's (left-padded, so every row's next token sits at the
same column), a finished row leaves at once. transformers' own `generate` runs one fixed batch to its
end, and its continuous-batching manager has no per-request LoRA adapters, so the step loop is ours;
the model forward, the KV cache (`DynamicCache`) and peft's mixed-adapter batches (`adapter_names`) are
the libraries'. Each row samples with its own temperature, top-p and random generator, so a seeded
request gets the same tokens whoever shares its batch.
"""

from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ayar.errors import AyarError
from ayar.kernels import base_model

BASE = "base"  # the public name of the base model (adapters off)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


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
    sampling: Sampling = Sampling()
    ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (cut at a stop string)
    emitted: int = 0  # characters of `text` already sent
    finish: str | None = None
    generator: torch.Generator | None = None
    decoder: object = None  # a backend's incremental detokenizer state, if it keeps one


@dataclass
class _Batch:
    """The running batch: rows, their KV cache and attention mask (left-padded), next tokens and positions."""

    rows: list[Row]
    cache: object  # DynamicCache
    mask: torch.Tensor  # [rows, columns]
    tokens: torch.Tensor  # [rows] the token each row feeds next
    positions: torch.Tensor  # [rows] that token's position


def valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and ".." not in name and name != BASE


class HFBackend:
    kind = "transformers"

    def __init__(self, engine, name: str):
        self.engine, self.tok, self.model = engine, engine.tok, engine.model
        self.renderer, self.stop_ids = engine.renderer, set(engine.stop_ids)
        self.lock = threading.Lock()  # steps vs. adapter load/unload
        self.adapters: dict[str, str] = {}  # public name -> peft adapter name
        if hasattr(self.model, "peft_config"):
            self.adapters[name] = self.model.active_adapter
        # A fully fine-tuned run is the model itself: served under the run's name, with no separate base.
        self.base_name = name if getattr(engine, "full_finetune", False) else BASE
        self.default_model = name if name in self.adapters else self.base_name
        self.context_window = int(getattr(base_model(self.model).config, "max_position_embeddings", 0) or 2048)
        self.device = engine.device
        self.batch: _Batch | None = None

    # --- models -----------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

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

    def text_of(self, row: Row) -> str:
        """The row's answer so far (re-decoded whole: a token may complete a multi-byte character)."""
        return self.tok.decode(row.ids, skip_special_tokens=True)

    # --- generation -------------------------------------------------------------------------------
    @property
    def active(self) -> list[Row]:
        return self.batch.rows if self.batch else []

    def admit(self, rows: list[Row]) -> None:
        """Prefill new rows together and merge them into the running batch."""
        from transformers import DynamicCache

        with self.lock, torch.no_grad():
            rows = self._drop_unloaded(rows)
            if not rows:
                return
            # checked before any forward: a forward that raises inside peft's mixed-adapter batch leaves its
            # per-row hooks behind, and every later forward of the model fails
            vocab = self.model.get_input_embeddings().num_embeddings
            if any(not r.prompt_ids or min(r.prompt_ids) < 0 or max(r.prompt_ids) >= vocab for r in rows):
                raise ValueError(f"a prompt is empty or has token ids outside the vocabulary (0..{vocab - 1})")
            width = max(len(r.prompt_ids) for r in rows)
            pad = self._pad_id()
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
                mask[i, width - len(r.prompt_ids) :] = 1
                if r.sampling.temperature > 0:
                    r.generator = torch.Generator().manual_seed(
                        r.sampling.seed if r.sampling.seed is not None else int(torch.randint(0, 2**62, (1,)))
                    )
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache()
            logits = self._forward(rows, ids, mask, positions, cache)
            new = self._accept_tokens(
                _Batch(rows, cache, mask, self._sample(logits[:, -1], rows), positions[:, -1] + 1)
            )
            if new is not None:
                self.batch = new if self.batch is None else _merge(self.batch, new)

    def step(self) -> None:
        """One decoding step of every running row."""
        with self.lock, torch.no_grad():
            b = self.batch
            self._drop_unloaded(b.rows)
            b = self.batch = _select(b, [i for i, r in enumerate(b.rows) if r.finish is None])
            if b is None:
                return
            b.mask = torch.cat([b.mask, b.mask.new_ones((len(b.rows), 1))], dim=1)
            logits = self._forward(b.rows, b.tokens[:, None], b.mask, b.positions[:, None], b.cache)
            b.tokens, b.positions = self._sample(logits[:, -1], b.rows), b.positions + 1
            self.batch = self._accept_tokens(b)

    def run(self, rows: list[Row]) -> None:
        """Generate `rows` to their end (outside the server's scheduler: tests, scripts)."""
        self.admit(rows)
        while self.batch is not None and any(r.finish is None for r in rows):
            self.step()

    def fail_all(self, rows: list[Row], message: str) -> None:
        """A step failed: end these rows and every running row with the error; start over with no batch."""
        fail_rows(rows + self.active, message)
        self.batch = None

    def _forward(self, rows, ids, mask, positions, cache):
        with self._adapters_for(rows) as extra:
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
        return out.logits.float()

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        tokens = logits.argmax(-1).cpu()
        for i, r in enumerate(rows):
            s = r.sampling
            if s.temperature > 0:
                row = logits[i].cpu()
                # the largest logit subtracted first: a tiny temperature (1e-38) then sends the others to -inf,
                # not every logit to +/-inf (whose softmax is NaN), i.e. greedy, as the limit says
                probs = torch.softmax((row - row.max()) / s.temperature, -1)
                if s.top_p < 1:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
                    sorted_p, order = probs.sort(descending=True)
                    cut = (sorted_p.cumsum(-1) - sorted_p) >= s.top_p
                    sorted_p[cut] = 0
                    probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
                try:
                    tokens[i] = torch.multinomial(probs, 1, generator=r.generator)[0]
                except RuntimeError as e:  # this row's numbers went bad: it fails alone, the batch goes on
                    fail_rows([r], f"sampling failed: {e}")
        return tokens

    def _accept_tokens(self, b: _Batch) -> _Batch | None:
        """Hand each row of `b` its new token; rows that finished leave the batch."""
        for r, token in zip(b.rows, b.tokens.tolist()):
            if r.finish is None and r.cancelled():
                _close(r, "cancelled")
            if r.finish is None:
                _accept(self, r, token)
        return _select(b, [i for i, r in enumerate(b.rows) if r.finish is None])

    def _drop_unloaded(self, rows: list[Row]) -> list[Row]:
        for r in rows:  # its adapter was unloaded while the request waited or ran
            if r.finish is None and r.model != self.base_name and r.model not in self.adapters:
                r.finish = "unloaded"
                r.on_finish("unloaded", len(r.ids))
        return [r for r in rows if r.finish is None]

    @contextlib.contextmanager
    def _adapters_for(self, rows: list[Row]):
        """Extra forward kwargs for these rows' adapters. One adapter (or none) for all rows runs at full
        speed; rows that differ use peft's mixed-batch path, which splits each layer's LoRA work by adapter."""
        if not hasattr(self.model, "peft_config"):
            yield {}
            return
        names = [self.adapters.get(r.model, "__base__") for r in rows]
        if set(names) == {"__base__"}:
            with self.model.disable_adapter():
                yield {}
        elif len(set(names)) == 1:
            if self.model.active_adapter != names[0]:  # switching walks every LoRA layer: only when it changes
                self.model.set_adapter(names[0])
            yield {}
        else:
            yield {"adapter_names": names}

    def _pad_id(self) -> int:
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else min(self.stop_ids)


def _select(b: _Batch, keep: list[int]) -> _Batch | None:
    """The batch with only the rows `keep`; leading columns that are padding for every row are dropped."""
    if len(keep) == len(b.rows):
        return b
    if not keep:
        return None
    index = torch.tensor(keep)
    b.cache.batch_select_indices(index.to(b.cache.layers[0].keys.device))
    b.rows = [b.rows[i] for i in keep]
    b.mask, b.tokens, b.positions = b.mask[index], b.tokens[index], b.positions[index]
    first = int(b.mask.any(0).int().argmax())
    if first > 0:
        b.mask = b.mask[:, first:]
        for layer in b.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    return b


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """One batch from two: the shorter one is left-padded to the other's width, in the mask and the cache."""
    width = max(a.mask.shape[1], b.mask.shape[1])

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - t.shape[dim]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.keys = torch.cat([pad(la.keys, 2), pad(lb.keys, 2)])
        la.values = torch.cat([pad(la.values, 2), pad(lb.values, 2)])
    return _Batch(
        a.rows + b.rows,
        a.cache,
        torch.cat([pad(a.mask, 1), pad(b.mask, 1)]),
        torch.cat([a.tokens, b.tokens]),
        torch.cat([a.positions, b.positions]),
    )


def _accept(backend: HFBackend, r: Row, token: int) -> None:
    """A row's new token: stop token, stop string, text to send (held back while it may begin a stop
    string or ends in half a character), or its token budget."""
    if token in backend.stop_ids:
        _close(r, "stop")
        return
    r.ids.append(token)
    text = r.text = backend.text_of(r)
    longest = max((len(s) for s in r.stop), default=0)
    cut = _first_stop(text, r.stop, max(0, r.emitted - longest))
    if cut is not None:
        r.text = text[:cut]
        _close(r, "stop")
        return
    if not text.endswith("\ufffd"):
        safe = len(text) - _stop_prefix(text, r.stop)
        if safe > r.emitted:
            r.on_delta(text[r.emitted : safe])
            r.emitted = safe
    if len(r.ids) >= r.max_tokens:
        _close(r, "length")


def fail_rows(rows: list[Row], message: str) -> None:
    for r in rows:
        if r.finish is None:
            r.finish = "error"
            r.on_finish("error: " + message, len(r.ids))


def _close(row: Row, reason: str) -> None:
    if len(row.text) > row.emitted and reason != "cancelled":  # text held back (a partial character, a stop cut)
        row.on_delta(row.text[row.emitted :])
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
        raise AyarError(
            f"{folder} has no adapter_model.safetensors: only safetensors adapters are loaded "
            "(pickle files can run code); convert it with peft's save_pretrained(safe_serialization=True)"
        )
    return folder
