"""The llama.cpp backend: a GGUF export served with the same row protocol as the other backends.
llama-cpp-python holds one sequence per context, so rows run one after another (first come, first
served); a step advances the running row by one token. The adapter is merged in: one model name."""

from __future__ import annotations

import threading

from ayar.errors import AyarError
from ayar.serve.backend import Row, _accept, _close


class GgufBackend:
    kind = "llama.cpp"

    def __init__(self, engine, name: str):
        self.engine = engine
        self.stop_ids = set(engine.stop_ids)
        self.context_window = engine.context_window
        self.default_model = name
        self.adapters: dict[str, str] = {}
        self.lock = threading.Lock()
        self.queue: list[Row] = []
        self.current = None  # the running row's token iterator

    def model_names(self) -> list[str]:
        return [self.default_model]

    def load_adapter(self, name, path) -> None:
        raise AyarError("a GGUF export has its adapter merged in: serve a run directory (transformers backend) "
                        "for adapters chosen per request")

    def unload_adapter(self, name) -> None:
        raise KeyError(name)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.engine.encode(messages)

    def encode_text(self, prompt: str) -> list[int]:
        return self.engine.llm.tokenize(prompt.encode(), add_bos=False, special=False)

    def text_of(self, row: Row) -> str:
        row.decoder = self.engine.piece(row.ids[-1], row.decoder or b"")
        return row.decoder.decode(errors="ignore")

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

    def run(self, rows: list[Row]) -> None:
        self.admit(rows)
        while any(r.finish is None for r in rows):
            self.step()

    def fail_all(self, rows: list[Row], message: str) -> None:
        for r in rows + self.queue:
            if r.finish is None:
                r.finish = "error"
                r.on_finish("error: " + message, len(r.ids))
        self.queue, self.current = [], None
