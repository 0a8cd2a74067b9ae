"""The ONE place a fine-tuning method is applied to a model, and where adapters are loaded back."""

from __future__ import annotations

import re
import sys

from ayar.errors import ConfigError

METHODS = ("lora", "dora", "full", "qlora", "qdora")

# lora.init -> peft's init_lora_weights
INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "pissa_fast": "pissa_niter_4", "olora": "olora"}
# PiSSA/OLoRA move the adapter's initial part out of the base weights: the trained adapter only fits that
# changed base, so it is saved converted against its initial copy (then it applies to the original base).
CONVERTED_INITS = ("pissa", "pissa_fast", "olora")


def apply_method(model, method: str, lora_cfg, task_type: str = "CAUSAL_LM"):
    """Wrap `model` for training with `method`; returns the trainable model."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    model, config = for_trainer(model, method, lora_cfg, task_type)
    model = _get_peft_model(model, config)
    trainable_in_fp32(model)
    return model


def for_trainer(model, method: str, lora_cfg, task_type: str = "CAUSAL_LM"):
    """(model, peft LoraConfig) for `method`: the base made ready for the adapter and the adapter's config, for
    trainers that wrap the model themselves (TRL's) and for `apply_method`. Over a 4-bit base (QLoRA/QDoRA) the base's
    unquantized rest (norms, embeddings, head) stays in the base's dtype where that is bf16 or fp32, as a LoRA run's
    does (and TRL 1's, Unsloth's, Answer.AI's fsdp_qlora): the norms compute in fp32 inside, and fp32 norms and
    embeddings over bf16 would double every activation kept for backward (measured: benchmarks/README.md); over fp16
    it goes to fp32 (peft's `prepare_model_for_kbit_training`), as fp16 overflows without. Checkpointing stays the
    run's own choice."""
    if method not in METHODS or method == "full":
        raise ConfigError(f"method {method!r} has no adapter; adapter methods: lora, dora, qlora, qdora")
    if method in ("qlora", "qdora"):
        _require_4bit(method)
        weights = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
        if quantized_rest_dtype(weights) != weights:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            model.requires_grad_(False)  # the base frozen, as peft's preparation does
            _own_rest(model)
        _keep_4bit_layout(model)
    return model, _lora_config(model, lora_cfg, dora=method in ("dora", "qdora"), task_type=task_type)


def _own_rest(model) -> None:
    """A 4-bit base's unquantized rest in memory of its own. Loaded from safetensors it is views into the file's
    mapping, which then stays mapped whole: every page the quantizing read (the whole file, as big as the model in
    bf16) stays counted in the process's memory through training (measured: benchmarks/README.md, QLoRA's rest). A
    copy lets the mapping go; the fp32 cast of an fp16 base does the same."""
    for p in model.parameters():
        if p.__class__.__name__ != "Params4bit" and not hasattr(p, "ds_id") and p.device.type == "cpu":
            p.data = p.data.clone()


def quantized_rest_dtype(weight_dtype: str) -> str:
    """The dtype of a 4-bit base's unquantized rest (norms, embeddings, head) as ayar trains QLoRA/QDoRA (`for_trainer`;
    the memory plan counts it): the base's own, but fp32 over fp16 weights."""
    return "float32" if weight_dtype == "float16" else weight_dtype


def trainable_in_fp32(model) -> None:
    """Every trainable weight of `model` in fp32. ayar trains adapters in fp32 whatever the base's dtype (peft's
    default, as in its own loop); TRL's trainers cast a 4-bit base's adapter to bf16 as they build (the QLoRA paper's
    choice), where AdamW's small updates round away and, on CPUs without bf16 instructions, every adapter matmul
    is slow; peft leaves a module it trains in full beside the adapters (a reward model's or classifier's score
    head, `lora.modules_to_save`) in the base's dtype, which accelerate's FSDP turns fp32 (its units take one dtype
    of trained weights, as DeepSpeed's ZeRO-3 does): fp32 under every strategy, the same run. Called as the
    adapter is made (`apply_method`) and on a Trainer stage's model after it is built, before its optimizer is. A
    weight DeepSpeed split as it was built (ZeRO-3 loading on rank 0) is left as it is: its parts are DeepSpeed's."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32 and not hasattr(p, "ds_id"):
            p.data = p.data.float()


def _keep_4bit_layout(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight for its fast inference kernel at the
    first forward in eval mode without gradients (an evaluation during training, GRPO's sampling) and keeps it so;
    training forwards then run that kernel, which has no backward, and the next step fails ("a view of a leaf
    Variable that requires grad is being used in an in-place operation"). A model being trained keeps the layout
    its backward reads: evaluations in the run take bitsandbytes' dequantizing path (tested in
    tests/unit/training/test_training.py on such a CPU)."""
    for _, module in four_bit_layers(model):
        module.support_avx512bf16_for_cpu = False


def four_bit_layers(model) -> list:
    """bitsandbytes' 4-bit linear layers of `model` (QLoRA's base), (name, module) pairs; none where bitsandbytes was
    never imported, as no model of this process can hold one then."""
    bnb = sys.modules.get("bitsandbytes.nn")
    return [] if bnb is None else [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.Linear4bit)]


def _get_peft_model(model, config):
    from peft import get_peft_model

    from ayar.kernels.dropout import use_fast_dropout

    empty = {name for name, p in model.named_parameters() if p.is_meta}
    originals = _stand_in(model) if empty else {}
    # peft keeps adapter weights in fp32 when the base is bf16/fp16 (autocast_adapter_dtype): stable updates.
    peft_model = get_peft_model(model, config)
    if next(model.parameters()).device.type == "cpu":
        use_fast_dropout(peft_model)
    if empty:
        _empty_again(peft_model, originals, empty)
    return peft_model


def base_name(name: str) -> str:
    """A parameter's name in the model before peft wrapped it, as its weight files name it:
    `base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight` -> `model.layers.0.self_attn.q_proj.weight`
    (a module trained in full, `modules_to_save`, is named after the weight its copy starts from)."""
    name = name.removeprefix("base_model.model.")
    for part in (".base_layer", ".modules_to_save.default", ".original_module"):
        name = name.replace(part, "")
    return name


def dora_layers(model) -> list[tuple]:
    """(layer, adapter name) of each DoRA magnitude vector in `model`."""
    return [(m, name) for m in model.modules() for name in getattr(m, "lora_magnitude_vector", {})]


def dora_by_rows(model) -> str | None:
    """Why DoRA's magnitudes cannot be computed from output rows alone (None where they can): each is the norm of
    an output row of its base weight, for a linear layer stored output-first; a layer stored transposed (Conv1D,
    `fan_in_fan_out`), a convolution or an embedding is named."""
    from peft.tuners.lora.dora import DoraLinearLayer

    for layer, name in dora_layers(model):
        # peft's DoRA for embeddings and convolutions subclass the linear one
        if type(layer.lora_magnitude_vector[name]) is not DoraLinearLayer or getattr(layer, "fan_in_fan_out", False):
            return f"DoRA on {type(layer.get_base_layer()).__name__} layers needs their whole weights"
    return None


def init_dora_magnitudes(model, rows, whole) -> None:
    """DoRA's magnitude vectors as peft computes them when it makes the adapter (each output row's norm of the base
    weight plus the scaled initial LoRA product, peft's own `get_weight_norm`), for a model whose base weights were
    read after peft wrapped it: each FSDP process reads its parts (training/sharding.py). The output rows of a
    weight and of its magnitude are split alike, so each process computes its own from `rows(t)` (its rows of t);
    `whole(t)`: t whole (LoRA's A, split by its rank dimension)."""
    import torch

    with torch.no_grad():
        for layer, name in dora_layers(model):
            a, b = whole(layer.lora_A[name].weight), rows(layer.lora_B[name].weight)
            magnitude = layer.lora_magnitude_vector[name]
            norm = magnitude.get_weight_norm(rows(layer.get_base_layer().weight), b @ a, layer.scaling[name])
            rows(magnitude.weight).copy_(norm)


def _stand_in(model) -> dict:
    """peft makes each adapter where its base layer's weight is: on a model built empty (the meta device: FSDP's
    processes that read no weights, training/sharding.py) the adapter would be empty too and its initial values
    lost. Each empty weight is replaced by a stand-in in CPU RAM, one element expanded to the weight's shape (no
    memory), so peft makes and initialises the adapter exactly as on the loaded model (the same random numbers in
    the same order). A packed 4-bit weight's stand-in has the shape it dequantizes to, which peft takes as already
    dequantized where it reads it (QDoRA's magnitudes, whose values then come with the rest from rank 0), and the
    quantization settings peft reads as it wraps the layer. Returns {id(stand-in): the empty weight} for
    `_empty_again`; tied weights share one."""
    import torch

    from ayar.models.load import replace_empty

    def stand_in(p):
        packed = getattr(p, "bnb_quantized", False)
        shape = p.quant_state.shape if packed else p.shape
        made = torch.nn.Parameter(torch.zeros((), dtype=p.dtype).expand(shape), requires_grad=p.requires_grad)
        if packed:
            made.compress_statistics, made.quant_type = p.compress_statistics, p.quant_type
        return made

    return replace_empty(model, stand_in)


def _empty_again(model, originals: dict, empty: set) -> None:
    """The base weights back on the meta device after peft wrapped them (`_stand_in`): the stand-ins, and the
    copies peft made of modules trained in full (`modules_to_save`); the adapter keeps its initial values."""
    import torch

    for module_name, module in model.named_modules():
        for key, p in module._parameters.items():
            if p is None or p.is_meta:
                continue
            if id(p) in originals:  # frozen or trained as peft left the stand-in
                module._parameters[key] = originals[id(p)].requires_grad_(p.requires_grad)
            elif base_name(f"{module_name}.{key}") in empty:
                meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
                module._parameters[key] = torch.nn.Parameter(meta, requires_grad=p.requires_grad)


def save_trained(model, out, init_dir=None, state_dict: dict | None = None) -> None:
    """Save the trained adapter (or the whole model for `full`). `init_dir`: the initial adapter of a
    PiSSA/OLoRA run (`save_initial`), against which the adapter is converted to fit the original base.
    `state_dict`: the weights to save instead of the model's own (FSDP: gathered whole from the split model)."""
    from pathlib import Path

    from ayar.fsutil import atomic_directory

    with atomic_directory(Path(out), fsync=True) as tmp:  # a kill while saving leaves the old folder or the new
        if init_dir is not None:
            model.save_pretrained(str(tmp), path_initial_model_for_weight_conversion=str(init_dir))
        else:
            model.save_pretrained(str(tmp), **({"state_dict": state_dict} if state_dict is not None else {}))


def save_initial(model, lora_cfg, out) -> str | None:
    """For PiSSA/OLoRA: save the adapter as initialised (needed to convert the trained one); else None."""
    if getattr(lora_cfg, "init", "default") not in CONVERTED_INITS or not hasattr(model, "peft_config"):
        return None
    config = model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True  # loading this copy back must not re-run the SVD on the changed base
    model.save_pretrained(str(out))
    config.init_lora_weights = init
    return str(out)


def _require_4bit(method: str) -> None:
    """QLoRA needs bitsandbytes (the `qlora` extra); its 4-bit NF4 kernels run on CUDA and, since 0.46, on CPU."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"method: {method} loads the base in 4-bit NF4 with bitsandbytes, which is not installed: "
            f"pip install -e '.[qlora]' (or use method: {'dora' if method == 'qdora' else 'lora'} with "
            "model.dtype: bfloat16, half the memory of float32)"
        ) from None


def quantization_config(method: str, compute_dtype, storage=None):
    """from_pretrained's quantization_config for `method`: 4-bit NF4 with double quantization for QLoRA/QDoRA
    (the matmuls run in `compute_dtype`), else None. `storage`: the dtype the packed 4-bit bytes are stored as
    (bitsandbytes' `quant_storage`, uint8 by default): FSDP and ZeRO-3 split floating-point weights, so under them
    the bytes are stored as the model's other weights are (the FSDP-QLoRA recipe of bitsandbytes' docs)."""
    if method not in ("qlora", "qdora"):
        return None
    _require_4bit(method)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        **({"bnb_4bit_quant_storage": storage} if storage is not None else {}),
    )


def _lora_config(model, lora_cfg, dora: bool = False, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    targets = lora_cfg.target_modules
    _check_targets(model, targets)
    layers = None
    if lora_cfg.freeze_first_layers:
        n = model.config.num_hidden_layers
        if not 0 < lora_cfg.freeze_first_layers < n:
            raise ConfigError(
                f"lora.freeze_first_layers={lora_cfg.freeze_first_layers}: this model has {n} layers; "
                f"freeze between 1 and {n - 1}"
            )
        layers = list(range(lora_cfg.freeze_first_layers, n))
        if targets == "all-linear":  # peft takes layer indices only with a list of module names
            import torch

            targets = sorted(
                {
                    name.rsplit(".", 1)[-1]
                    for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and re.search(r"\.layers?\.\d+\.", name)
                }
            )
        elif isinstance(targets, str):
            raise ConfigError(
                "lora.freeze_first_layers works with target_modules: all-linear or a list of names, not a regex"
            )
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        use_rslora=lora_cfg.rslora,
        use_dora=dora,
        modules_to_save=lora_cfg.modules_to_save or None,
        layers_to_transform=layers,
        init_lora_weights=INITS[getattr(lora_cfg, "init", "default")],
        task_type=task_type,
    )
    return config


def _check_targets(model, targets) -> None:
    """Fail with the available module names when a target list or regex matches nothing."""
    import torch

    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    if targets == "all-linear":
        return
    if isinstance(targets, str):
        full = [name for name, _ in model.named_modules()]
        if not any(re.fullmatch(targets, n) for n in full):
            raise ConfigError(
                f"lora.target_modules regex {targets!r} matches no module; linear layers here: {', '.join(linear)}"
            )
        return
    missing = [t for t in targets if t not in linear]
    if missing:
        raise ConfigError(
            f"lora.target_modules {missing} not found in the model; linear layers here: {', '.join(linear)} (or "
            "use all-linear)"
        )


def matches_target(module_name: str, targets) -> bool:
    """Whether peft's LoRA would wrap the linear layer `module_name` (the output head is never a target)."""
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return module_name.rsplit(".", 1)[-1] in targets


def load_adapter(model, adapter_dir: str, trainable: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""

    def count(p) -> int:
        if getattr(p, "quant_state", None) is not None:
            return p.quant_state.shape.numel()  # 4-bit: packed 2 per byte
        return getattr(p, "ds_numel", None) or p.numel()  # split by DeepSpeed ZeRO-3: its tensor holds nothing

    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    total = sum(count(p) for p in model.parameters())
    return trainable, total


def stackable(adapters: list[str]) -> str | None:
    """None when `adapters` (LoRA folders, applied in order) can be written as one exactly equal adapter;
    else why not. Merging plain LoRA adapters in order adds s_i * B_i @ A_i each, which one adapter of rank
    sum(r_i) holds exactly; DoRA rescales the merged weight (not additive), and modules trained in full
    (modules_to_save) would need peft to pick one copy."""
    from peft import PeftConfig

    for path in adapters:
        config = PeftConfig.from_pretrained(path)
        if getattr(config, "use_dora", False):
            return f"{path} is a DoRA adapter (DoRA's rescaling does not add up across adapters)"
        if getattr(config, "modules_to_save", None):
            return f"{path} trains {', '.join(config.modules_to_save)} in full (modules_to_save)"
        if getattr(config, "target_parameters", None):
            return f"{path} targets parameters directly"
    return None


def stack_adapters(model, adapters: list[str], out, base: str) -> None:
    """Write to `out` one LoRA adapter equal to applying `adapters` in order to `base`: peft's `cat`
    combination (A matrices stacked, B side by side). `model` is any PeftModel of the same architecture
    (the run's own: the adapters' weights do not depend on the base weights it holds); it is left with only
    its own adapters. Check `stackable` first."""
    import json
    import math
    import shutil
    from pathlib import Path

    from ayar.fsutil import atomic_directory

    names = [f"ayar_stack_{i}" for i in range(len(adapters))]
    active = model.active_adapter
    try:
        for name, path in zip(names, adapters):
            model.load_adapter(path, adapter_name=name, is_trainable=False)
        first = model.peft_config[names[0]]
        configs = [model.peft_config[name] for name in names]
        rank = sum(max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs)
        # the new adapter's scaling is lora_alpha / r = 1 (or sqrt(r) with rsLoRA): divide it out of the weights
        scaling = math.sqrt(rank) if first.use_rslora else 1.0
        model.add_weighted_adapter(names, [1.0 / scaling] * len(names), "ayar_stacked", combination_type="cat")
        with atomic_directory(Path(out), fsync=True) as tmp:
            model.save_pretrained(str(tmp), selected_adapters=["ayar_stacked"])
            for f in (tmp / "ayar_stacked").iterdir():
                shutil.move(str(f), tmp / f.name)
            (tmp / "ayar_stacked").rmdir()
            cfg_file = tmp / "adapter_config.json"
            config = json.loads(cfg_file.read_text())
            # loading must not re-run an initialisation (PiSSA would change the base), and it applies to `base`
            config.update(base_model_name_or_path=base, init_lora_weights=True)
            cfg_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    finally:
        for name in [*names, "ayar_stacked"]:
            if name in model.peft_config:
                model.delete_adapter(name)
        model.set_adapter(active)
