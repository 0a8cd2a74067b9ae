"""The onnxruntime-genai backend: an ONNX export (`ayar export --to onnx`) served with the same row
protocol as the transformers backend. Each row has its own onnxruntime-genai Generator (its KV cache,
sampling and seed); a step advances every running row by one token, so requests join and leave between
steps. The adapter is merged into an ONNX export: one model name, no per-request adapters."""

from __future__ import annotations

from ayar.serve.backend import Row, _accept, _close
from ayar.serve.backend_export import ExportBackend


class OnnxBackend(ExportBackend):
    kind = "onnxruntime-genai"

    def __init__(self, engine, name: str):
        super().__init__(engine, name)
        self.tok = engine.tok
        self.running: list[tuple[Row, object]] = []

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
        with self.lock:  # all rows or none join (the scheduler retries a failed admit row by row)
            started = []
            for r in rows:
                s = r.sampling
                started.append((r, self.engine.generator(r.prompt_ids, r.max_tokens, s.temperature, s.top_p, s.seed)))
            self.running += started

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

    def reset(self) -> None:
        self.running = []
