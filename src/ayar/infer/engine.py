"""A loaded model ready to answer: a run directory (base + adapter) or a plain model directory."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ayar.config import DataConfig, GenerationConfig, ModelConfig, TrainConfig
from ayar.config.loader import from_dict
from ayar.data.render import Renderer, stop_token_ids
from ayar.errors import AyarError
from ayar.infer.presets import generation_kwargs


@dataclass
class Reply:
    text: str
    stopped: bool  # ended with EOS / end-of-turn, not by exhausting max_new_tokens
    new_tokens: int


class Engine:
    def __init__(self, model, tokenizer, renderer: Renderer, generation: GenerationConfig, device: str, source: str):
        self.model, self.tok, self.renderer = model, tokenizer, renderer
        self.generation, self.device, self.source = generation, device, source
        self.stop_ids = stop_token_ids(tokenizer, getattr(model, "get_base_model", lambda: model)())
        self.last: Reply | None = None  # the full reply of the latest `stream` call
        self.full_finetune = False  # a `method: full` run: the weights are the tuned model (no adapter to disable)

    def stream(self, messages: list[dict] | str, **overrides) -> Iterator[str]:
        """Yield text pieces as they are generated; the final Reply is available as `self.last`."""
        from transformers import TextIteratorStreamer

        inputs = self._encode(messages)
        kw = self._kwargs(overrides)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        result = {}

        def work():
            with torch.no_grad():
                result["out"] = self.model.generate(**inputs, **kw, streamer=streamer)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            yield piece
        thread.join()
        self.last = self._reply(result["out"][0, inputs["input_ids"].shape[1]:], "".join(pieces))

    def generate(self, messages: list[dict] | str, **overrides) -> Reply:
        inputs = self._encode(messages)
        kw = self._kwargs(overrides)
        with torch.no_grad():
            out = self.model.generate(**inputs, **kw)
        new = out[0, inputs["input_ids"].shape[1]:]
        return self._reply(new, self.tok.decode(new, skip_special_tokens=True))

    def generate_batch(self, conversations: list[list[dict]], batch_size: int = 8, **overrides) -> list[Reply]:
        """Answers to many conversations: batched with left padding (rows of similar length together, to
        waste little on padding), KV cache on; replies come back in input order."""
        texts = [self.renderer.prompt_text(m) for m in conversations]
        kw = self._kwargs(overrides)
        replies: list[Reply | None] = [None] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        side, self.tok.padding_side = self.tok.padding_side, "left"
        try:
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                enc = self.tok([texts[i] for i in chunk], return_tensors="pt", padding=True,
                               add_special_tokens=self.renderer.template == "alpaca")
                enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                with torch.no_grad():
                    out = self.model.generate(**enc, **kw)
                for row, i in zip(out[:, enc["input_ids"].shape[1]:].tolist(), chunk):
                    end = next((j + 1 for j, t in enumerate(row) if t in self.stop_ids), len(row))
                    row = row[:end]  # finished rows are padded to the batch's longest; cut at the stop token
                    replies[i] = self._reply(torch.tensor(row), self.tok.decode(row, skip_special_tokens=True))
        finally:
            self.tok.padding_side = side
        return replies

    def base_model(self):
        """A context in which the model answers without its adapter (the base model), without a second copy."""
        import contextlib

        disable = getattr(self.model, "disable_adapter", None)
        return disable() if disable is not None else contextlib.nullcontext()

    def _encode(self, messages: list[dict] | str) -> dict:
        if isinstance(messages, str):  # a bare prompt is one user message
            messages = [{"role": "user", "content": messages}]
        text = self.renderer.prompt_text(messages)
        add_special = self.renderer.template == "alpaca"
        enc = self.tok(text, return_tensors="pt", add_special_tokens=add_special)
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def _kwargs(self, overrides: dict) -> dict:
        gen = GenerationConfig(**{**self.generation.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
        kw = generation_kwargs(gen)
        kw["eos_token_id"] = self.stop_ids
        kw["pad_token_id"] = self.tok.pad_token_id
        return kw

    def _reply(self, new_ids, text: str) -> Reply:
        ids = new_ids.tolist()
        stopped = bool(ids) and ids[-1] in self.stop_ids
        return Reply(text=text.strip(), stopped=stopped, new_tokens=len(ids))


def load_engine(source: str | Path, generation: GenerationConfig | None = None, log=print, dtype: str | None = None) -> Engine:
    """`source`: an ayar run directory, a local model directory, `default`, or a hub id. `dtype` overrides
    the run's (`float32` for an export's reference)."""
    from ayar.models.load import load_model_and_tokenizer, load_tokenizer, merge_adapters

    from ayar.infer.onnx_engine import OnnxEngine, is_onnx_dir

    if is_onnx_dir(source):  # an `ayar export --to onnx` folder answers through onnxruntime-genai
        return OnnxEngine(source, generation)
    from ayar.infer.gguf_engine import GgufEngine, gguf_file

    if gguf_file(source) is not None and not (Path(str(source)) / "config.json").is_file():
        return GgufEngine(source, generation)  # a GGUF file or `ayar export --to gguf` folder: llama.cpp
    path = Path(str(source))
    if (path / "run.json").is_file():
        from ayar.models.adapters import load_adapter
        from ayar.train.rundir import RunDir

        run = RunDir.open(path)
        cfg = from_dict(TrainConfig, run.read_config_dict(), where=str(run.config))
        if cfg.task != "causal_lm" or cfg.stage == "reward":
            raise AyarError(f"{run.path} is a {'reward model' if cfg.stage == 'reward' else cfg.task} run: it scores text "
                            "instead of generating it (see its README.md for how to use it)")
        meta = run.read_meta()
        full = run.full_model.is_dir()
        model_cfg = ModelConfig(**{**cfg.model.__dict__, "name": str(run.full_model) if full else meta["base_model"],
                                   **({"dtype": dtype} if dtype else {})})
        model, _, placement, _ = load_model_and_tokenizer(model_cfg, log=log)
        model = merge_adapters(model, [] if full else meta.get("merged_adapters", []), log)
        tok = load_tokenizer(str(run.tokenizer))
        if run.adapter.is_dir():
            model = load_adapter(model, str(run.adapter))
        elif not full:
            log(f"{run.path} has no adapter/ yet (unfinished run?): using the base model")
        data_cfg, gen_cfg = cfg.data, generation or cfg.generation
    else:
        model, tok, placement, _ = load_model_and_tokenizer(ModelConfig(name=str(source), **({"dtype": dtype} if dtype else {})), log=log)
        data_cfg = DataConfig(template="chat" if tok.chat_template else "alpaca")
        gen_cfg = generation or GenerationConfig()
    model.eval()
    renderer = Renderer(tok, data_cfg.template, data_cfg.max_length, False, data_cfg.system_prompt)
    engine = Engine(model, tok, renderer, gen_cfg, placement.device, str(source))
    engine.full_finetune = (path / "run.json").is_file() and (path / "model").is_dir()
    return engine
