"""What the engines of exported models (ONNX, GGUF) share on top of their runtime's `stream`: generation
settings resolved like the transformers Engine's, one-shot and many-prompt answers."""

from __future__ import annotations

from ayar.config import GenerationConfig
from ayar.infer.engine import Reply


class ExportEngine:
    def __init__(self, source, generation: GenerationConfig | None):
        self.source, self.generation = str(source), generation or GenerationConfig()
        self.device = "cpu"
        self.last: Reply | None = None  # the full reply of the latest `stream` call

    @staticmethod
    def as_messages(messages: list[dict] | str) -> list[dict]:
        return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages

    def settings(self, overrides: dict) -> tuple[int, float, float]:
        """(max_new_tokens, temperature, top_p) from the engine's generation config and per-call overrides."""
        gen = GenerationConfig(**{**self.generation.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
        temperature = gen.temperature if gen.temperature is not None else (0.8 if gen.preset == "creative" else 0.0)
        return gen.max_new_tokens, temperature, gen.top_p or 1.0

    def stream(self, messages, **overrides):
        raise NotImplementedError

    def generate(self, messages, **overrides) -> Reply:
        for _ in self.stream(messages, **overrides):
            pass
        return self.last

    def generate_batch(self, conversations: list, batch_size: int = 8, **overrides) -> list[Reply]:
        """Answers in input order. These runtimes keep one sequence per generator here, so they run one
        after another (the transformers engine batches them in one forward)."""
        return [self.generate(c, **overrides) for c in conversations]
