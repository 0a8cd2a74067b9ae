"""The llama.cpp backend: a GGUF export served with the same row protocol as the other backends.

Batched (the default): every active row is a sequence of one llama.cpp context (its own KV cells, `n_seq_max`
sequences), and each step is one `llama_decode` carrying one token per decoding row plus prompt chunks of rows being
prefilled, as llama.cpp's own server does with its parallel slots. Rows join and leave between steps. A finished
row's cells stay as its slot's prompt cache (each slot has a KV stream of its own, which no other row could use):
the next row seated there keeps the common prefix (the chat template's opening, a shared system prompt) and only the
rest is removed and prefilled, as llama-server's prompt cache does; each row samples from its own logits with its
own temperature, top-p and seeded generator, so a row gets the same tokens whoever shares the step. The model
weights are the engine's (loaded once); the batch, context and sampling loop are ours, through llama-cpp-python's
low-level API, because its high-level `Llama` holds one sequence. `SerialGgufBackend` is the earlier rows-in-turn
version, kept for the benchmark's comparison. The adapter is merged in: one model name."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ayar.errors import AyarError
from ayar.serve.backend import Row, _accept, _close, fail_rows
from ayar.serve.backend_export import ExportBackend


@dataclass
class _Slot:
    row: Row
    seq: int  # the llama.cpp sequence id (its KV cells)
    todo: list[int]  # prompt tokens not yet decoded
    n_past: int = 0  # tokens in the KV cache
    fed: list[int] | None = None  # those tokens (the slot's prompt cache once the row is done)
    next: int | None = None  # the sampled token to feed next
    rng: np.random.Generator | None = None


class GgufBackend(ExportBackend):
    kind = "llama.cpp"

    def __init__(self, engine, name: str, max_batch: int = 8, slot_context: int = 2048, prefill_chunk: int = 512):
        super().__init__(engine, name)
        import llama_cpp as L

        self.L = L
        self.n_slots = max(1, int(max_batch))
        # each row's room (prompt + answer); the context holds one such stream per slot
        self.slot_context = min(int(slot_context), int(engine.context_window))
        self.context_window = self.slot_context
        self.chunk = int(prefill_chunk)
        params = L.llama_context_default_params()
        params.n_ctx = self.slot_context * self.n_slots
        params.n_seq_max = self.n_slots
        params.n_batch = params.n_ubatch = self.chunk + self.n_slots
        params.n_threads = params.n_threads_batch = os.cpu_count() or 1
        params.kv_unified = False  # a KV stream per sequence: attention never looks at another row's cells
        model = engine.llm._model.model
        self.ctx = L.llama_init_from_model(model, params)
        if not self.ctx:
            raise AyarError(f"llama.cpp could not make a context of {params.n_ctx} tokens for {self.n_slots} rows")
        self.memory = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        self.batch = L.llama_batch_init(params.n_batch, 0, 1)
        self.slots: list[_Slot] = []
        self.cached: dict[int, list[int]] = {}  # free sequence id -> the tokens its KV cells still hold
        self.waiting: list[Row] = []  # rows beyond the slots (a request with more rows than --max-batch)
        import atexit

        atexit.register(self.close)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.ctx = None

    def encode_text(self, prompt: str) -> list[int]:
        return self.engine.llm.tokenize(prompt.encode(), add_bos=False, special=False)

    def text_of(self, row: Row) -> str:
        row.decoder = self.engine.piece(row.ids[-1], row.decoder or b"")
        return row.decoder.decode(errors="ignore")

    @property
    def active(self) -> list[Row]:
        return [s.row for s in self.slots] + list(self.waiting)

    def admit(self, rows: list[Row]) -> None:
        too_long = [r for r in rows if len(r.prompt_ids) >= self.slot_context]
        fail_rows(too_long, f"the prompt is longer than this server's {self.slot_context}-token context per row")
        with self.lock:
            self.waiting += [r for r in rows if r not in too_long]
            self._seat()

    def step(self) -> None:
        with self.lock:
            self._leave()
            self._seat()
            if not self.slots:
                return
            fed = self._fill()
            rc = self.L.llama_decode(self.ctx, self.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} for {self.batch.n_tokens} tokens")
            for slot, n, out in fed:
                slot.n_past += n
                if out is None:
                    continue
                logits = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, out), shape=(self.n_vocab,))
                token = _sample(logits, slot)
                _accept(self, slot.row, token)
                slot.next = token
                if slot.row.finish is None and slot.n_past + 1 >= self.slot_context:  # its cells are full
                    _close(slot.row, "length")
            self._leave()

    def _fill(self) -> list[tuple[_Slot, int, int | None]]:
        """One token for every decoding row, then prompt chunks for rows still being prefilled, within the
        batch size; returns (slot, tokens fed, batch index of its logits or None)."""
        b, fed, n = self.batch, [], 0

        def put(token: int, pos: int, seq: int, logits: bool) -> None:
            nonlocal n
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = token, pos, 1, logits
            b.seq_id[n][0] = seq
            n += 1

        for s in self.slots:
            if not s.todo and s.next is not None:
                put(s.next, s.n_past, s.seq, True)
                s.fed.append(s.next)
                fed.append((s, 1, n - 1))
        room = self.chunk
        for s in self.slots:
            if s.todo and room > 0:
                take, s.todo = s.todo[:room], s.todo[room:]
                for i, token in enumerate(take):
                    put(token, s.n_past + i, s.seq, not s.todo and i == len(take) - 1)
                s.fed += take
                fed.append((s, len(take), n - 1 if not s.todo else None))
                room -= len(take)
        b.n_tokens = n
        return fed

    def _seat(self) -> None:
        """Waiting rows into free slots, each where the cached tokens share the longest prefix with its prompt
        (kept; the rest of the slot's cells removed). At least the prompt's last token is decoded again: its
        logits give the first answer token."""
        free = set(range(self.n_slots)) - {s.seq for s in self.slots}
        while self.waiting and free:
            row = self.waiting.pop(0)
            if row.finish is not None:
                continue
            prompt = row.prompt_ids
            seq = max(sorted(free), key=lambda q: _common(self.cached.get(q, []), prompt))
            free.discard(seq)
            keep = min(_common(self.cached.pop(seq, []), prompt), len(prompt) - 1)
            if not self.L.llama_memory_seq_rm(self.memory, seq, keep, -1):  # a model that cannot cut: start over
                self.L.llama_memory_seq_rm(self.memory, seq, -1, -1)
                keep = 0
            rng = np.random.default_rng(row.sampling.seed)
            self.slots.append(_Slot(row, seq, list(prompt[keep:]), n_past=keep, fed=list(prompt[:keep]), rng=rng))

    def _leave(self) -> None:
        """Rows that finished or were cancelled leave; their KV cells are freed for the next row."""
        keep = []
        for s in self.slots:
            if s.row.finish is None and s.row.cancelled():
                _close(s.row, "cancelled")
            if s.row.finish is None:
                keep.append(s)
            else:  # its cells hold exactly what was fed (a row cancelled mid-prefill: the part fed so far)
                self.cached[s.seq] = s.fed
        self.slots = keep
        for r in self.waiting:
            if r.finish is None and r.cancelled():
                _close(r, "cancelled")
        self.waiting = [r for r in self.waiting if r.finish is None]

    def reset(self) -> None:
        """After a failed step: every slot emptied (what the cells hold is no longer known)."""
        with self.lock:
            self.L.llama_memory_clear(self.memory, True)
            self.slots, self.waiting, self.cached = [], [], {}


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _sample(logits: np.ndarray, slot: _Slot) -> int:
    """Greedy at temperature 0; else softmax(logits / T) cut to the top-p mass, drawn with the row's generator."""
    s = slot.row.sampling
    if s.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), s.top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(slot.rng.choice(len(p), p=p))


class SerialGgufBackend(ExportBackend):
    """Rows one after another through llama-cpp-python's `generate` (first come, first served): the version
    before batching, kept as the benchmark's baseline (`ayar bench serve --sides ayar-serial`)."""

    kind = "llama.cpp (rows in turn)"

    def __init__(self, engine, name: str, max_batch: int = 8):
        super().__init__(engine, name)
        self.queue: list[Row] = []
        self.current = None  # the running row's token iterator

    encode_text = GgufBackend.encode_text
    text_of = GgufBackend.text_of

    @property
    def active(self) -> list[Row]:
        return list(self.queue)

    def admit(self, rows: list[Row]) -> None:
        with self.lock:
            self.queue += rows

    def step(self) -> None:
        with self.lock:
            while self.queue and self.queue[0].finish is not None:
                self.queue.pop(0)
                self.current = None
            if not self.queue:
                return
            r = self.queue[0]
            if r.cancelled():
                _close(r, "cancelled")
                return
            if self.current is None:
                s = r.sampling
                self.current = self.engine.tokens(r.prompt_ids, r.max_tokens, s.temperature, s.top_p, s.seed)
            token = next(self.current, None)
            if token is None:
                _close(r, "length")
            else:
                _accept(self, r, token)
            if r.finish is not None:
                self.queue.pop(0)
                self.current = None

    def reset(self) -> None:
        self.queue, self.current = [], None
