"""A GGUF model (`ayar export --to gguf`) answering through llama.cpp (llama-cpp-python): the Engine protocol
(infer/base.py) like the transformers engine, so `ayar chat`, `ayar.load`, the release gate and `ayar serve`
take it. Prompts are rendered with the chat template stored in the GGUF, as llama.cpp's users get them;
stop tokens are the GGUF's own (EOS and end-of-turn)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ayar.config import GenerationConfig
from ayar.errors import AyarError
from ayar.infer.base import Reply
from ayar.infer.exported import ExportedEngine


def gguf_file(path) -> Path | None:
    """The GGUF model to load for `path`: the file itself, or the only model *.gguf in an export folder (a GGUF
    LoRA export holds the base model and `adapter-*.gguf`)."""
    path = Path(str(path))
    if path.is_file() and path.suffix == ".gguf":
        return path
    found = [f for f in sorted(path.glob("*.gguf")) if not f.name.startswith("adapter")] if path.is_dir() else []
    return found[0] if len(found) == 1 else None


def gguf_adapter(path) -> Path | None:
    """The GGUF LoRA of a GGUF LoRA export folder (`ayar export --to gguf --kind lora`), or None."""
    path = Path(str(path))
    found = sorted(path.glob("adapter*.gguf")) if path.is_dir() else []
    return found[0] if len(found) == 1 else None


def require_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise AyarError(
            "this needs llama.cpp's Python bindings: pip install -e '.[gguf]' (llama-cpp-python builds "
            "llama.cpp, a few minutes); f16 and q8_0 exports work without it"
        ) from None


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel's AMX matrix units (Sapphire Rapids and newer), which llama.cpp uses by itself."""
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@contextmanager
def model_params(**fields):
    """llama.cpp's model parameters, `fields` set, for a `Llama` made inside (llama-cpp-python's `Llama` takes no
    argument for some of them and reads llama.cpp's defaults)."""
    import llama_cpp.llama_cpp as native

    default = native.llama_model_default_params

    def params():
        made = default()
        for name, value in fields.items():
            setattr(made, name, value)
        return made

    native.llama_model_default_params = params
    try:
        yield
    finally:
        native.llama_model_default_params = default


class quiet_native_stderr:
    """Silence what C code writes to file descriptor 2 (Python's sys.stderr is left alone)."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


class GgufEngine(ExportedEngine):
    kind = "llama.cpp"

    def __init__(self, path: str | Path, generation: GenerationConfig | None = None):
        require_llama_cpp()
        from llama_cpp import Llama

        super().__init__(path, generation)
        self.adapter = gguf_adapter(path)  # applied by llama.cpp over the base, unmerged
        # On a CPU with AMX llama.cpp repacks quantized weights for it, and decoding a q8_0 or Q4_K_M model then
        # crashed (segfault in its AMX matmul; llama.cpp issue #20824, fix proposed in PR #26954): there the weights
        # keep the file's layout (no repacking into other buffers)
        with model_params(**({"use_extra_bufts": False} if cpu_has_amx() else {})):
            self.llm = Llama(
                model_path=str(gguf_file(path) or path),
                lora_path=str(self.adapter) if self.adapter else None,
                n_ctx=2048,
                logits_all=True,
                verbose=False,
                n_threads=os.cpu_count(),
            )
        if hasattr(self.llm, "close"):  # free it before interpreter teardown, or llama-cpp-python's __del__ complains
            import atexit

            atexit.register(self.llm.close)
        meta = self.llm.metadata
        self.template = meta.get("tokenizer.chat_template")
        self.stop_ids = sorted(
            {self.llm.token_eos()} | {int(meta[k]) for k in ("tokenizer.ggml.eot_token_id",) if k in meta}
        )
        self.bos = (
            self.llm.detokenize([self.llm.token_bos()]).decode(errors="replace") if self.llm.token_bos() >= 0 else ""
        )
        self.eos = self.llm.detokenize([self.llm.token_eos()]).decode(errors="replace")
        self.context_window = self.llm.n_ctx()

    def token_name(self, i: int) -> str:
        return self.llm.detokenize([i], special=True).decode(errors="replace")

    def encode(self, messages: list[dict]) -> list[int]:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not self.template:
            raise AyarError("the GGUF has no tokenizer.chat_template")
        text = (
            ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            .from_string(self.template)
            .render(messages=messages, add_generation_prompt=True, bos_token=self.bos, eos_token=self.eos)
        )
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        self.llm.reset()
        out = []
        for token in self.llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if token in self.stop_ids or len(out) >= max_new_tokens:
                break
        return out

    def logprobs(self, ids: list[int]):
        import numpy as np
        import torch

        self.llm.reset()
        self.llm.eval(ids)
        scores = np.array(self.llm.scores[: len(ids)], dtype=np.float32)
        return torch.log_softmax(torch.from_numpy(scores), -1)

    def tokens(
        self, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None
    ) -> Iterator[int]:
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
        for token in self.tokens(self.prompt_ids(messages), max_new_tokens, temperature, top_p):
            ids.append(token)
            if token in self.stop_ids:
                break
            raw = self.piece(token, raw)
            text = raw.decode(errors="ignore")
            if len(text) > len(sent):
                yield text[len(sent) :]
                sent = text
        stopped = bool(ids) and ids[-1] in self.stop_ids
        self.last = Reply(text=sent.strip(), stopped=stopped, new_tokens=len(ids))
