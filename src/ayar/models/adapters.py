"""The ONE place a fine-tuning method is applied to a model, and where adapters are loaded back."""

from __future__ import annotations

import re

from ayar.errors import ConfigError


METHODS = ("lora", "dora", "qlora", "qdora")


def apply_method(model, method: str, lora_cfg):
    """Wrap `model` for training with `method`; returns the trainable model."""
    if method in ("qlora", "qdora"):
        _require_4bit(method)
    if method in METHODS:
        return _apply_lora(model, lora_cfg, dora=method in ("dora", "qdora"))
    raise ConfigError(f"method {method!r} is not supported; available: {', '.join(METHODS)}")


def _require_4bit(method: str) -> None:
    """QLoRA needs a 4-bit NF4 base from bitsandbytes, which ayar supports on CUDA only."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"method: {method} needs a CUDA GPU (its base model is loaded in 4-bit NF4 by bitsandbytes); "
                          f"on this machine use method: {'dora' if method == 'qdora' else 'lora'} with model.dtype: bfloat16 "
                          "(half the memory of float32) or auto")
    # Loading the base in 4-bit (BitsAndBytesConfig) is not wired in yet: no GPU was at hand to test it.
    raise ConfigError(f"method: {method} is not available yet (its 4-bit base loading is untested without a GPU); "
                      f"use method: {'dora' if method == 'qdora' else 'lora'} with model.dtype: bfloat16")


def _apply_lora(model, lora_cfg, dora: bool = False):
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.target_modules
    _check_targets(model, targets)
    layers = None
    if lora_cfg.freeze_first_layers:
        n = model.config.num_hidden_layers
        if not 0 < lora_cfg.freeze_first_layers < n:
            raise ConfigError(f"lora.freeze_first_layers={lora_cfg.freeze_first_layers}: this model has {n} layers; "
                              f"freeze between 1 and {n - 1}")
        layers = list(range(lora_cfg.freeze_first_layers, n))
        if targets == "all-linear":  # peft takes layer indices only with a list of module names
            import torch

            targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear) and re.search(r"\.layers?\.\d+\.", name)})
        elif isinstance(targets, str):
            raise ConfigError("lora.freeze_first_layers works with target_modules: all-linear or a list of names, not a regex")
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        use_rslora=lora_cfg.rslora,
        use_dora=dora,
        modules_to_save=lora_cfg.modules_to_save or None,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    # peft keeps adapter weights in fp32 when the base is bf16/fp16 (autocast_adapter_dtype): stable updates.
    return get_peft_model(model, config)


def _check_targets(model, targets) -> None:
    """Fail with the available module names when a target list or regex matches nothing."""
    import torch

    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    if targets == "all-linear":
        return
    if isinstance(targets, str):
        full = [name for name, _ in model.named_modules()]
        if not any(re.fullmatch(targets, n) for n in full):
            raise ConfigError(f"lora.target_modules regex {targets!r} matches no module; linear layers here: {', '.join(linear)}")
        return
    missing = [t for t in targets if t not in linear]
    if missing:
        raise ConfigError(f"lora.target_modules {missing} not found in the model; linear layers here: {', '.join(linear)} (or use all-linear)")


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
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
