"""Rules across fields of one config: combinations that cannot work are refused when the config is
loaded (`load_config`, `ayar config validate`, a resumed run's config.yaml, every hyperparameter trial),
before anything heavy loads. Field types, choices and value ranges are checked by the loader itself."""

from __future__ import annotations

from ayar.config.schema import EvalConfig, TrainConfig
from ayar.errors import ConfigError


def validate(cfg) -> None:
    """Raise one ConfigError listing every broken rule of `cfg` (a TrainConfig or EvalConfig)."""
    errors = cross_field_errors(cfg)
    if errors:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {e}" for e in errors))


def cross_field_errors(cfg) -> list[str]:
    if isinstance(cfg, TrainConfig):
        return _train(cfg)
    if isinstance(cfg, EvalConfig):
        return _eval(cfg)
    return []


def _train(cfg: TrainConfig) -> list[str]:
    errors = []
    causal_sft = cfg.stage == "sft" and cfg.task == "causal_lm"
    what = "task: classification" if cfg.task != "causal_lm" else f"stage: {cfg.stage}"
    if cfg.task == "classification" and cfg.stage != "sft":
        errors.append(
            f"task: classification trains with stage: sft (a classifier head on labelled texts), not stage: {cfg.stage}"
        )
    if cfg.training.loss and not causal_sft:
        errors.append("training.loss (a custom token loss) applies to stage: sft with task: causal_lm only")
    if cfg.method == "full" and not causal_sft:
        errors.append(f"method: full is supported for stage: sft with task: causal_lm; use method: lora for {what}")
    if cfg.method == "full" and cfg.lora.init != "default":
        errors.append(f"lora.init: {cfg.lora.init} initialises an adapter; method: full has none")
    per_step, group = cfg.training.batch_size * cfg.training.grad_accum, cfg.grpo.num_generations
    if cfg.stage == "grpo" and per_step % group:
        errors.append(
            f"stage: grpo samples grpo.num_generations={group} answers per prompt, so training.batch_size x "
            f"grad_accum ({per_step}) must be a multiple of it; e.g. training.batch_size={group}"
        )
    if cfg.stage != "sft" and cfg.lora.init in ("pissa", "pissa_fast", "olora"):
        errors.append(
            f"lora.init: {cfg.lora.init} changes the base weights, but stage: {cfg.stage} needs them intact "
            "(the adapter-disabled model is its reference / starting point); use lora.init: default"
        )
    if cfg.data.validation is None and cfg.data.test is None and cfg.data.val_ratio + cfg.data.test_ratio >= 1:
        errors.append(
            f"data.val_ratio + data.test_ratio ({cfg.data.val_ratio} + {cfg.data.test_ratio}) leave no "
            "training rows: keep their sum below 1"
        )
    return errors


def _eval(cfg: EvalConfig) -> list[str]:
    errors = []
    if bool(cfg.run) == bool(cfg.baseline):
        errors.append("give a run directory to evaluate, or --baseline MODEL (with --data) to evaluate a model alone")
    if cfg.baseline and not cfg.data:
        errors.append("--baseline needs --data FILE: the prompts to evaluate the model on")
    return errors
