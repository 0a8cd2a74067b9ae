"""The ONE place a fine-tuning method is applied to a model, and where adapters are loaded back."""

from __future__ import annotations

import re

from ayar.errors import ConfigError


def apply_method(model, method: str, lora_cfg):
    """Wrap `model` for training with `method`; returns the trainable model."""
    if method == "lora":
        return _apply_lora(model, lora_cfg)
    raise ConfigError(f"method {method!r} is not supported; available: lora")


def _apply_lora(model, lora_cfg):
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.target_modules
    _check_targets(model, targets)
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
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
