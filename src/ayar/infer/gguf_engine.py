"""A GGUF export (`ayar export --to gguf`) answering through llama.cpp (llama-cpp-python): the same
`generate` / `stream` surface as the transformers Engine, so `ayar chat`, `ayar.load` and `ayar serve`
take it. Prompts are rendered with the chat template stored in the GGUF, as llama.cpp's users get them."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ayar.config import GenerationConfig
from ayar.infer.engine import Reply
from ayar.infer.export_engine import ExportEngine


def gguf_file(path) -> Path | None:
    """The GGUF to load for `path`: the file itself, or the only model-*.gguf in an export folder."""
    path = Path(str(path))
    if path.is_file() and path.suffix == ".gguf":
        return path
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    return found[0] if len(found) == 1 else None


class GgufEngine(ExportEngine):
    kind = "llama.cpp"

    def __init__(self, path: str | Path, generation: GenerationConfig | None = None):
        from ayar.export.gguf import GgufArtifact

        super().__init__(path, generation)
        self.artifact = GgufArtifact(gguf_file(path) or path)
        self.llm = self.artifact.llm
        self.stop_ids = sorted(self.artifact.stop_ids)
        self.context_window = self.llm.n_ctx()

    def encode(self, messages: list[dict] | str) -> list[int]:
        return self.artifact.prompt_ids(self.as_messages(messages))

    def tokens(self, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[int]:
        """New tokens, one at a time (the caller stops reading when it is done)."""
        if seed is not None:
            self.llm.set_seed(seed)
        kw = {"temp": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {"temp": 0.0, "top_k": 1}
        for n, token in enumerate(self.llm.generate(ids, reset=True, repeat_penalty=1.0, **kw)):
            yield int(token)
            if n + 1 >= max_new_tokens:
                return

    def piece(self, token: int, previous: bytes) -> bytes:
        return previous + self.llm.detokenize([token])

    def stream(self, messages, **overrides) -> Iterator[str]:
        max_new_tokens, temperature, top_p = self.settings(overrides)
        raw, sent, ids = b"", "", []
        for token in self.tokens(self.encode(messages), max_new_tokens, temperature, top_p):
            ids.append(token)
            if token in self.stop_ids:
                break
            raw = self.piece(token, raw)
            text = raw.decode(errors="ignore")
            if len(text) > len(sent):
                yield text[len(sent):]
                sent = text
        stopped = bool(ids) and ids[-1] in self.stop_ids
        self.last = Reply(text=sent.strip(), stopped=stopped, new_tokens=len(ids))
