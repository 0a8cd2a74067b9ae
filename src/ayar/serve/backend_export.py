"""What the backends of exported models (ONNX, GGUF) share: one model name (the adapter is merged in),
no adapters per request, the row protocol's `run` and `fail_all`."""

from __future__ import annotations

import threading

from ayar.errors import AyarError
from ayar.serve.backend import Row, fail_rows


class ExportBackend:
    kind = "export"

    def __init__(self, engine, name: str):
        self.engine = engine
        self.stop_ids = set(engine.stop_ids)
        self.context_window = engine.context_window
        self.default_model = name
        self.lock = threading.Lock()

    @property
    def adapters(self) -> dict[str, str]:
        return {}

    def model_names(self) -> list[str]:
        return [self.default_model]

    def load_adapter(self, name, path) -> None:
        raise AyarError(
            f"this model is an export ({self.kind}) with its adapter merged in: serve a run directory "
            "(transformers backend) for adapters chosen per request"
        )

    def unload_adapter(self, name) -> None:
        raise KeyError(name)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.engine.prompt_ids(messages)

    @property
    def active(self) -> list[Row]:
        raise NotImplementedError

    def admit(self, rows: list[Row]) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def run(self, rows: list[Row]) -> None:
        """Generate `rows` to their end (outside the server's scheduler: tests, scripts)."""
        self.admit(rows)
        while any(r.finish is None for r in rows):
            self.step()

    def fail_all(self, rows: list[Row], message: str) -> None:
        fail_rows(rows + self.active, message)
        self.reset()

    def reset(self) -> None:
        raise NotImplementedError
