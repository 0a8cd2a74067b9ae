"""The onnxruntime-genai backend: an ONNX export (`ayar export --to onnx`) served with the same row
protocol as the transformers backend. Each row has its own onnxruntime-genai Generator (its KV cache,
sampling and seed); a step advances every running row by one token, so requests join and leave between
steps. The adapter is merged into an ONNX export: one model name, no per-request adapters."""

from __future__ import annotations

import threading

from ayar.errors import AyarError
from ayar.serve.backend import Row, _accept, _close


class OnnxBackend:
    kind = "onnxruntime-genai"

    def __init__(self, engine, name: str):
        self.engine, self.tok = engine, engine.tok
        self.stop_ids = set(engine.stop_ids)
        self.context_window = engine.context_window
        self.default_model = name
        self.adapters: dict[str, str] = {}
        self.lock = threading.Lock()
        self.running: list[tuple[Row, object]] = []

    def model_names(self) -> list[str]:
        return [self.default_model]

    def load_adapter(self, name, path) -> None:
        raise AyarError("an ONNX export has its adapter merged in: serve a run directory (transformers backend) "
                        "for adapters chosen per request")

    def unload_adapter(self, name) -> None:
        raise KeyError(name)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.engine.encode(messages)

    def encode_text(self, prompt: str) -> list[int]:
        return [int(i) for i in self.tok.encode(prompt)]

    def text_of(self, row: Row) -> str:
        """The runtime's own streaming detokenizer, one per row, fed the row's newest token."""
        if row.decoder is None:
            row.decoder = [self.tok.create_stream(), ""]
        row.decoder[1] += row.decoder[0].decode(row.ids[-1])
        return row.decoder[1]

    @property
    def active(self) -> list[Row]:
        return [r for r, _ in self.running]

    def admit(self, rows: list[Row]) -> None:
        with self.lock:
            for r in rows:
                s = r.sampling
                gen = self.engine.generator(r.prompt_ids, r.max_tokens, s.temperature, s.top_p, s.seed)
                self.running.append((r, gen))

    def step(self) -> None:
        with self.lock:
            for r, gen in self.running:
                if r.cancelled():
                    _close(r, "cancelled")
                    continue
                gen.generate_next_token()
                _accept(self, r, int(gen.get_next_tokens()[0]))
                if r.finish is None and gen.is_done():  # the runtime's own length limit
                    _close(r, "length")
            self.running = [(r, g) for r, g in self.running if r.finish is None]

    def run(self, rows: list[Row]) -> None:
        self.admit(rows)
        while any(r.finish is None for r in rows):
            self.step()

    def fail_all(self, rows: list[Row], message: str) -> None:
        for r in rows + self.active:
            if r.finish is None:
                r.finish = "error"
                r.on_finish("error: " + message, len(r.ids))
        self.running = []
