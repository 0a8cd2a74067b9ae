"""Which runtime answers for a path: the first loader in RUNTIMES whose test accepts it. One list, read in
order: exported artifacts first (an ONNX folder, a GGUF file or folder), then transformers (run directories,
model directories, `default`, hub ids)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ayar.config import DataConfig, GenerationConfig, ModelConfig
from ayar.errors import AyarError
from ayar.infer.base import Engine


def load_engine(
    source: str | Path, generation: GenerationConfig | None = None, log=print, dtype: str | None = None
) -> Engine:
    """`source`: an ayar run directory, a local model directory, `default`, a hub id, or an export (ONNX
    folder, GGUF file or folder). `dtype` overrides the run's (`float32` for an export's reference)."""
    for accepts, load in RUNTIMES:
        if accepts(source):
            return load(source, generation, log, dtype)
    raise AssertionError("the transformers runtime accepts any source")


def _is_onnx(source) -> bool:
    from ayar.infer.onnx_engine import is_onnx_dir

    return is_onnx_dir(source)


def _is_gguf(source) -> bool:
    from ayar.infer.gguf_engine import gguf_file

    return gguf_file(source) is not None and not (Path(str(source)) / "config.json").is_file()


def _onnx(source, generation, log, dtype) -> Engine:
    from ayar.infer.onnx_engine import OnnxEngine

    return OnnxEngine(source, generation)


def _gguf(source, generation, log, dtype) -> Engine:
    from ayar.infer.gguf_engine import GgufEngine

    return GgufEngine(source, generation)


def _transformers(source, generation, log, dtype) -> Engine:
    from ayar.data.render import Renderer
    from ayar.infer.transformers_engine import TransformersEngine
    from ayar.models.load import load_model_and_tokenizer, load_tokenizer, merge_adapters

    path = Path(str(source))
    dtype_override = {"dtype": dtype} if dtype else {}
    full = False
    if (path / "run.json").is_file():
        from ayar.models.adapters import load_adapter
        from ayar.rundir import RunDir

        run = RunDir.open(path)
        cfg = run.read_config()
        if cfg.task != "causal_lm" or cfg.stage == "reward":
            what = "reward model" if cfg.stage == "reward" else cfg.task
            raise AyarError(
                f"{run.path} is a {what} run: it scores text instead of generating it (see its README.md "
                "for how to use it)"
            )
        meta = run.read_meta()
        full = run.full_model.is_dir()
        model_cfg = ModelConfig(
            **{**cfg.model.__dict__, "name": str(run.full_model) if full else meta["base_model"], **dtype_override}
        )
        model, _, placement, _ = load_model_and_tokenizer(model_cfg, log=log)
        model = merge_adapters(model, [] if full else meta.get("merged_adapters", []), log)
        tok = load_tokenizer(str(run.tokenizer))
        if run.trained_adapter.is_dir():  # on the start model: its adapter-off model is what the run began from
            model = load_adapter(model, str(run.trained_adapter))
        elif not full:
            log(f"{run.path} has no adapter/ yet (unfinished run?): using the base model")
        data_cfg, gen_cfg = cfg.data, generation or cfg.generation
    else:
        model, tok, placement, _ = load_model_and_tokenizer(ModelConfig(name=str(source), **dtype_override), log=log)
        data_cfg = DataConfig(template="chat" if tok.chat_template else "alpaca")
        gen_cfg = generation or GenerationConfig()
    model.eval()
    renderer = Renderer(tok, data_cfg.template, data_cfg.max_length, False, data_cfg.system_prompt)
    engine = TransformersEngine(model, tok, renderer, gen_cfg, placement.device, str(source))
    engine.full_finetune = full
    return engine


# (accepts(source), load(source, generation, log, dtype)), tried in order
RUNTIMES: list[tuple[Callable, Callable]] = [(_is_onnx, _onnx), (_is_gguf, _gguf), (lambda source: True, _transformers)]
