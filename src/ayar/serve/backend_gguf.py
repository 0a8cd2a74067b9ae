"""The llama.cpp backend: a GGUF export served with the same row protocol as the other backends.
llama-cpp-python holds one sequence per context, so rows run one after another (first come, first
served); a step advances the running row by one token. The adapter is merged in: one model name."""

from __future__ import annotations

from ayar.serve.backend import Row, _accept, _close
from ayar.serve.backend_export import ExportBackend


class GgufBackend(ExportBackend):
    kind = "llama.cpp"

    def __init__(self, engine, name: str):
        super().__init__(engine, name)
        self.queue: list[Row] = []
        self.current = None  # the running row's token iterator

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

    def reset(self) -> None:
        self.queue, self.current = [], None
