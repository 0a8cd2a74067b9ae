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
version, kept for the benchmark's comparison.

Adapters: a merged GGUF export is one model name. A GGUF LoRA export (`--kind lora`) is a base with the run's adapter
applied by llama.cpp unmerged: the base answers as `base`, the run under its name, and more GGUF LoRAs on the same
base load under their own names (`--adapter`, POST /admin/adapters). llama.cpp applies one set of adapters to a whole
`llama_decode`, so a step with rows of several adapters makes one decode per adapter (its cost: `ayar bench serve
--sides ayar-gguf-lora,ayar-gguf-2lora`); a row's KV cells were computed with its adapter, so a slot's prompt cache
is reused only by a row of the same adapter."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ayar.errors import AyarError
from ayar.serve.backend import BASE, Row, _accept, _close, fail_rows
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
    adapter: str | None = None  # the row's LoRA (None: the GGUF's own weights)


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
        # free sequence id -> (the adapter they were computed with, the tokens its KV cells still hold)
        self.cached: dict[int, tuple[str | None, list[int]]] = {}
        self.waiting: list[Row] = []  # rows beyond the slots (a request with more rows than --max-batch)
        self.loras: dict[str, object] = {}  # public name -> llama.cpp adapter
        self.in_use: str | None = None  # the adapter set on the context now
        # a GGUF LoRA export: the base under `base`, the run's adapter under the run's name
        self.base_name = BASE if engine.adapter else name
        if engine.adapter:
            self._load(name, engine.adapter)
        import atexit

        atexit.register(self.close)

    # --- adapters ----------------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, str]:
        return {name: name for name in self.loras}

    def model_names(self) -> list[str]:
        return [self.base_name, *self.loras] if self.base_name == BASE else [self.base_name]

    def load_adapter(self, name: str, path) -> None:
        """A GGUF LoRA (a .gguf, a GGUF LoRA export, or a run with a gated one) under `name`."""
        from ayar.exports.gguf_lora import lora_file

        if self.base_name != BASE:
            raise AyarError(
                "this GGUF has its run's adapter merged in: serve a GGUF LoRA export (ayar export RUN --to gguf --kind "
                "lora) to choose adapters per request"
            )
        self._load(name, lora_file(path))

    def _load(self, name: str, file) -> None:
        with self.lock:
            if name in self.loras or name == BASE:
                raise AyarError(f"an adapter named {name!r} is already loaded: unload it first or pick another name")
            lora = self.L.llama_adapter_lora_init(self.engine.llm._model.model, str(file).encode())
            if not lora:
                raise AyarError(f"llama.cpp could not load {file} as a LoRA of this model (one made for another base?)")
            self.loras[name] = lora
            self._forget(name)

    def unload_adapter(self, name: str) -> None:
        """Rows of this adapter, running or waiting, end at once (`unloaded`): their cells are of no use to a
        later adapter of the same name."""
        with self.lock:
            if name not in self.loras:
                raise KeyError(name)
            for row in [s.row for s in self.slots if s.adapter == name] + [r for r in self.waiting if r.model == name]:
                if row.finish is None:
                    _close(row, "unloaded")
            self._use(None)
            self.L.llama_adapter_lora_free(self.loras.pop(name))
            self._forget(name)

    def _forget(self, name: str) -> None:
        """Prompt caches computed with an adapter of this name are stale once it is (re)loaded."""
        self.cached = {seq: c for seq, c in self.cached.items() if c[0] != name}

    def _use(self, adapter: str | None) -> None:
        if adapter == self.in_use:
            return
        L = self.L
        if adapter is None:
            rc = L.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            rc = L.llama_set_adapters_lora(
                self.ctx, (L.llama_adapter_lora_p_ctypes * 1)(self.loras[adapter]), 1, (L.ctypes.c_float * 1)(1.0)
            )
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not set the adapter {adapter!r} (error {rc})")
        self.in_use = adapter

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
            groups: dict[str | None, list[_Slot]] = {}
            for s in self.slots:
                groups.setdefault(s.adapter, []).append(s)
            for adapter in sorted(groups, key=lambda a: a != self.in_use):  # the adapter set now first
                self._use(adapter)
                self._decode(groups[adapter])
            self._leave()

    def _decode(self, slots: list[_Slot]) -> None:
        """One llama_decode for these slots (all of one adapter), then each decoding row's next token."""
        fed = self._fill(slots)
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

    def _fill(self, slots: list[_Slot]) -> list[tuple[_Slot, int, int | None]]:
        """One token for every decoding row and prompt chunks for rows still being prefilled (at most `chunk`
        prompt tokens a step); returns (slot, tokens fed, batch index of its logits or None).

        In sequence order: with a KV stream per sequence, llama.cpp cuts a batch into micro-batches of consecutive,
        increasing sequence ids only (llama_batch_allocr::split_equal, `sequential`), each one a whole pass over
        the weights. Eight rows fed in seating order (3, 0, 5, ...) took several passes a step, about twice the
        time of one (benchmarks/README.md); in order, and seated in runs (_seat), they take one."""
        b, fed, n = self.batch, [], 0

        def put(token: int, pos: int, seq: int, logits: bool) -> None:
            nonlocal n
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = token, pos, 1, logits
            b.seq_id[n][0] = seq
            n += 1

        room = self.chunk
        for s in sorted(slots, key=lambda s: s.seq):
            if not s.todo and s.next is not None:
                put(s.next, s.n_past, s.seq, True)
                s.fed.append(s.next)
                fed.append((s, 1, n - 1))
            elif s.todo and room > 0:
                take, s.todo = s.todo[:room], s.todo[room:]
                for i, token in enumerate(take):
                    put(token, s.n_past + i, s.seq, not s.todo and i == len(take) - 1)
                s.fed += take
                fed.append((s, len(take), n - 1 if not s.todo else None))
                room -= len(take)
        b.n_tokens = n
        return fed

    def _seat(self) -> None:
        """Waiting rows into free slots: the one that keeps the seats of the row's adapter in the fewest runs of
        consecutive ids, the lowest of those (see _fill: each run is a pass), unless another holds a prefix of the
        prompt longer by PREFIX_UNIT tokens or more (a conversation going on); the slot's cached prefix is kept,
        the rest of its cells removed. At least the prompt's last token is decoded again: its logits give the
        first answer token."""
        free = set(range(self.n_slots)) - {s.seq for s in self.slots}
        while self.waiting and free:
            row = self.waiting.pop(0)
            if row.finish is not None:
                continue
            if row.model not in (BASE, self.base_name, *self.loras):  # its adapter was unloaded while it waited
                _close(row, "unloaded")
                continue
            adapter = row.model if row.model in self.loras else None
            prompt = row.prompt_ids

            def reusable(q: int) -> int:  # cells computed with another adapter are of no use to this row
                cached = self.cached.get(q, (None, []))
                return _common(cached[1], prompt) if cached[0] == adapter else 0

            group = {s.seq for s in self.slots if s.adapter == adapter}  # its adapter's rows decode together
            seq = max(free, key=lambda q: (reusable(q) // PREFIX_UNIT, -_runs(group | {q}), -q))
            free.discard(seq)
            keep = min(reusable(seq), len(prompt) - 1)
            self.cached.pop(seq, None)
            if not self.L.llama_memory_seq_rm(self.memory, seq, keep, -1):  # a model that cannot cut: start over
                self.L.llama_memory_seq_rm(self.memory, seq, -1, -1)
                keep = 0
            rng = np.random.default_rng(row.sampling.seed)
            self.slots.append(
                _Slot(row, seq, list(prompt[keep:]), n_past=keep, fed=list(prompt[:keep]), rng=rng, adapter=adapter)
            )

    def _leave(self) -> None:
        """Rows that finished or were cancelled leave; their KV cells are freed for the next row."""
        keep = []
        for s in self.slots:
            if s.row.finish is None and s.row.cancelled():
                _close(s.row, "cancelled")
            if s.row.finish is None:
                keep.append(s)
            elif s.row.finish != "unloaded":  # its cells hold exactly what was fed
                self.cached[s.seq] = (s.adapter, s.fed)
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


PREFIX_UNIT = 256  # tokens of prompt cache worth seating a row away from the lowest free slot


def _runs(seats: set[int]) -> int:
    """Runs of consecutive ids: the passes llama.cpp makes for a batch of these sequences."""
    return sum(1 for q in seats if q - 1 not in seats)


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
