"""Load a model and its tokenizer from `default`, a local directory, or a hub id (where there is network)."""

from __future__ import annotations

import json
from pathlib import Path

from ayar.errors import ModelError
from ayar.models.device import Placement, choose_placement


def resolve_model_path(name: str, log=print) -> str:
    """`default` -> the converted default model; a local directory -> itself; anything else -> a hub id."""
    if name in ("default", "", None):
        from ayar.models.default import ensure_default_model

        return str(ensure_default_model(log=log))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} is a directory but has no config.json: point model.name at a Hugging Face model directory"
            )
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model directory not found: {name}")
    return _hub_model(name)


def _hub_model(repo_id: str) -> str:
    """A hub id: fetched by transformers where the hub is reachable; else from the local HF cache, or a
    clear error at once (instead of minutes of connection retries)."""
    from huggingface_hub import snapshot_download

    from ayar.hub import hub_reachable

    if hub_reachable():
        return repo_id
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        raise ModelError(
            f"cannot load {repo_id!r}: no network to reach the model hub and no cached copy. "
            "Pass a local model directory, or `model.name: default`."
        ) from None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(path, "tokenizer", e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # padding is masked by attention_mask and labels, never trained
    return tok


def load_model(
    path: str,
    placement: Placement,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    auto_class=None,
    **kwargs,
):
    from transformers import AutoModelForCausalLM

    try:
        model = (auto_class or AutoModelForCausalLM).from_pretrained(
            path,
            dtype=placement.dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError) as e:
        raise _load_error(path, "model", e) from None
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return model  # built split by DeepSpeed ZeRO-3 (training/zero.py): each part is on its device already
    return model.to(placement.device)


def empty_model(
    path: str,
    placement: Placement,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    auto_class=None,
    quantization_config=None,
    **kwargs,
):
    """The model's modules without its weights, for the FSDP processes other than rank 0: they receive their parts
    of rank 0's weights as the model is split (training/sharding.py; accelerate's `cpu_ram_efficient_loading` for
    the Trainer stages) instead of each reading the whole model first. Parameters on the meta device (no memory);
    buffers real (accelerate's `init_empty_weights(include_buffers=False)`): the rotary frequencies, which no state
    dict holds and FSDP does not send, are computed from the config as in a loaded model. `kwargs` set config
    fields (num_labels, id2label) as `from_pretrained` would; with `quantization_config` (QLoRA's) the layers
    from_pretrained would quantize are made bitsandbytes' 4-bit ones, still empty (`_as_quantized`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(path, "model", e) from None
    with init_empty_weights(include_buffers=False):
        model = (auto_class or AutoModelForCausalLM).from_config(
            config, dtype=placement.dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
    model.tie_weights()  # the context makes each parameter anew as it is set: tied embeddings came apart
    if quantization_config is not None:
        _as_quantized(model, quantization_config, placement)
    return model


def _as_quantized(model, quantization_config, placement: Placement) -> None:
    """An empty model's layers made what from_pretrained makes them with `quantization_config` before it loads any
    weight (transformers' own quantizer: bitsandbytes' 4-bit layers, the same layers left unquantized, the model
    marked as loaded in 4-bit), still empty: the packed weights' shapes and their quant states come from rank 0
    (training/sharding.py `four_bit_from_rank0`)."""
    import torch
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization_config)
    quantizer.preprocess_model(model=model, dtype=placement.dtype, device_map={"": "cpu"}, checkpoint_files=None)
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    # bitsandbytes makes a 4-bit layer's bias in torch's default dtype (fp32); loaded, it is in the model's, and FSDP
    # gathers what every rank holds alike (a mismatch fails gloo's all-gather with a size error)
    from bitsandbytes.nn import Linear4bit  # imported by the quantizer above

    for layer in model.modules():
        if isinstance(layer, Linear4bit) and layer.bias is not None and layer.bias.dtype != placement.dtype:
            layer.bias = torch.nn.Parameter(layer.bias.to(placement.dtype), requires_grad=layer.bias.requires_grad)


def replace_empty(model, make, where=lambda p: True) -> dict:
    """Each parameter of `model` on the meta device (that `where` picks) replaced in its module by `make(p)`
    (`replace_parameters`). Returns {id(replacement): the empty parameter it replaced}."""
    return replace_parameters(model, make, lambda p: p.is_meta and where(p))


def replace_parameters(model, make, where=lambda p: True) -> dict:
    """Each parameter of `model` that `where` picks replaced in its module by `make(p)`; a weight two modules share
    (tied embeddings) gets one replacement, still shared. Returns {id(replacement): the parameter it replaced}."""
    made, replaced = {}, {}
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and where(p):
                if id(p) not in made:
                    made[id(p)] = make(p)
                    replaced[id(made[id(p)])] = p
                module._parameters[key] = made[id(p)]
    return replaced


def starting_point(name: str) -> tuple[str, list[str]]:
    """`model.name` -> (base model, adapters merged into it, in order). An ayar run directory stands for its
    own starting point plus its adapter, so a stage can continue from an earlier run (DPO after SFT)."""
    path = Path(str(name)).expanduser()
    if not (path / "run.json").is_file():
        return name, []
    meta = json.loads((path / "run.json").read_text())
    if (path / "model" / "config.json").is_file():  # a full fine-tune: the run holds the whole model
        return str((path / "model").resolve()), []
    if not (path / "adapter" / "adapter_config.json").is_file():
        raise ModelError(f"{path} is an ayar run without a finished adapter/: point model.name at a completed run")
    trained = path / "stage_adapter" if (path / "stage_adapter").is_dir() else path / "adapter"
    return meta["base_model"], [*meta.get("merged_adapters", []), str(trained.resolve())]


def model_folder(name: str) -> Path | None:
    """The folder on this machine holding the model `name` (a starting point's base: `default` or a folder), without
    converting or fetching anything; None where there is none (a hub id, the default model before its first
    conversion)."""
    if name in ("default", "", None):
        from ayar.models.default import default_model_dir

        path = default_model_dir()
    else:
        path = Path(str(name)).expanduser()
    return path if (path / "config.json").is_file() else None


def stored_dtype(name: str):
    """The dtype a model's weights are stored in (its config.json's `dtype`), without loading or converting
    anything; None where that is not known here (a hub id, the default model before its first conversion)."""
    import torch

    path = model_folder(starting_point(name)[0])
    if path is None:
        return None
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    dtype = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, dtype, None) if isinstance(dtype, str) else None


def merge_adapters(model, adapters: list[str], log=print):
    """Merge each LoRA adapter into the weights, in order (the model a later stage starts from)."""
    from peft import PeftModel

    for adapter in adapters:
        log(f"merge  {adapter}")
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model


def load_model_and_tokenizer(
    model_cfg, placement: Placement | None = None, log=print, auto_class=None, empty: bool = False, **model_kwargs
):
    """Returns (model, tokenizer, placement, resolved_path). `placement`: where and in which dtype (a run
    plan's decision); default: chosen from the config's device and dtype. `auto_class`: the transformers Auto class
    (default AutoModelForCausalLM; AutoModelForSequenceClassification for classifiers and reward models),
    `model_kwargs` go to its from_pretrained (num_labels, id2label). `empty`: the model without its weights
    (`empty_model`; starting from the base model itself)."""
    base, adapters = starting_point(model_cfg.name)
    path = resolve_model_path(base, log=log)
    placement = placement or choose_placement(model_cfg.device, model_cfg.dtype)
    tok = load_tokenizer(path, model_cfg.trust_remote_code)
    if empty and adapters:
        raise ValueError("an empty model cannot merge adapters")  # the plan refuses these first
    load = empty_model if empty else load_model
    model = load(
        path, placement, model_cfg.attn_implementation, model_cfg.trust_remote_code, auto_class, **model_kwargs
    )
    return merge_adapters(model, adapters, log), tok, placement, path


def _load_error(path: str, what: str, e: Exception) -> ModelError:
    if not Path(path).exists():
        return ModelError(
            f"could not load {what} {path!r} from the model hub (no network here?): "
            f"pass a local model directory or `model.name: default`. ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]})"
        )
    return ModelError(f"could not load {what} from {path}: {str(e).splitlines()[0][:300]}")
