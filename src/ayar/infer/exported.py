"""What the engines of exported models (ONNX, GGUF) share on top of their runtime's `stream`: generation
settings resolved like the transformers engine's, one-shot and many-prompt answers."""

from __future__ import annotations

from ayar.config import GenerationConfig
from ayar.infer.base import Reply, as_messages
from ayar.infer.presets import default_sampling


class ExportedEngine:
    def __init__(self, source, generation: GenerationConfig | None):
        self.source, self.generation = str(source), generation or GenerationConfig()
        self.device = "cpu"
        self.last: Reply | None = None  # the full reply of the latest `stream` call

    def settings(self, overrides: dict) -> tuple[int, float, float]:
        """(max_new_tokens, temperature, top_p) from the engine's generation config and per-call overrides."""
        gen = GenerationConfig(**{**self.generation.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
        return gen.max_new_tokens, *default_sampling(gen)

    def prompt_ids(self, messages: list[dict] | str) -> list[int]:
        return self.encode(as_messages(messages))

    def encode(self, messages: list[dict]) -> list[int]:
        raise NotImplementedError

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
