"""An ONNX export (`ayar export --to onnx`) answering through onnxruntime-genai: the same `generate` /
`stream` surface as the transformers engine (infer/base.py: Engine), so `ayar chat`, `ayar.load`, the release
gate and `ayar serve` take either."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ayar.config import GenerationConfig
from ayar.errors import AyarError
from ayar.infer.base import Reply
from ayar.infer.exported import ExportedEngine


def is_onnx_dir(path) -> bool:
    return (Path(str(path)) / "genai_config.json").is_file()


def require_onnx() -> None:
    try:
        import onnx_ir  # noqa: F401
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        raise AyarError("ONNX needs the export extra: pip install -e '.[export]' (onnxruntime-genai, onnx, onnx-ir)")


class OnnxEngine(ExportedEngine):
    kind = "onnxruntime-genai"

    def __init__(self, path: str | Path, generation: GenerationConfig | None = None):
        require_onnx()
        import onnxruntime_genai as og

        super().__init__(path, generation)
        self.og = og
        self.model = og.Model(str(path))
        self.tok = og.Tokenizer(self.model)
        config = json.loads((Path(path) / "genai_config.json").read_text())["model"]
        eos = config["eos_token_id"]
        self.stop_ids = sorted(eos if isinstance(eos, list) else [eos])
        self.context_window = int(config.get("context_length") or 2048)

    def encode(self, messages: list[dict]) -> list[int]:
        text = self.tok.apply_chat_template(messages=json.dumps(messages), add_generation_prompt=True)
        return [int(i) for i in self.tok.encode(text)]

    def generator(
        self, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None
    ):
        params = self.og.GeneratorParams(self.model)
        options = {"max_length": min(self.context_window, len(ids) + max_new_tokens), "do_sample": temperature > 0}
        if temperature > 0:
            options.update(temperature=temperature, top_p=top_p, top_k=0)
            if seed is not None:
                options["random_seed"] = seed
        params.set_search_options(**options)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(ids)
        return gen

    def token_name(self, i: int) -> str:
        return self.tok.decode([i])

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        gen, out = self.generator(ids, max_new_tokens), []
        while not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out

    def logprobs(self, ids: list[int]):
        import torch

        gen = self.generator(ids, 1)  # the prompt's logits come back for every position: teacher-forced
        return torch.log_softmax(torch.from_numpy(gen.get_output("logits")[0]).float(), -1)

    def stream(self, messages, **overrides) -> Iterator[str]:
        max_new_tokens, temperature, top_p = self.settings(overrides)
        gen = self.generator(self.prompt_ids(messages), max_new_tokens, temperature, top_p)
        stream, ids, pieces = self.tok.create_stream(), [], []
        while not gen.is_done():
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            ids.append(token)
            if token in self.stop_ids:
                break
            piece = stream.decode(token)
            if piece:
                pieces.append(piece)
                yield piece
        stopped = bool(ids) and ids[-1] in self.stop_ids
        self.last = Reply(text="".join(pieces).strip(), stopped=stopped, new_tokens=len(ids))
