"""`ayar train`'s dispatch: a config's stage and task pick the runner; combinations that cannot work are
refused here, before anything loads."""

from __future__ import annotations

import importlib
from pathlib import Path

from ayar.config import TrainConfig
from ayar.config.loader import from_dict
from ayar.errors import ConfigError

# stage -> module holding its `STAGE` (train/trainer_stage.py runs it); sft has its own loop (train/sft.py)
TRAINER_STAGES = {"dpo": "ayar.train.preference", "reward": "ayar.train.reward", "grpo": "ayar.train.grpo"}


def check_combination(cfg: TrainConfig) -> None:
    if cfg.task == "classification" and cfg.stage != "sft":
        raise ConfigError(f"task: classification trains with stage: sft (a classifier head on labelled texts), not stage: {cfg.stage}")
    if cfg.training.loss and (cfg.stage != "sft" or cfg.task != "causal_lm"):
        raise ConfigError("training.loss (a custom token loss) applies to stage: sft with task: causal_lm only")
    if cfg.method == "full" and (cfg.stage != "sft" or cfg.task != "causal_lm"):
        raise ConfigError(f"method: full is supported for stage: sft with task: causal_lm; use method: lora for "
                          f"{'task: classification' if cfg.task != 'causal_lm' else 'stage: ' + cfg.stage}")
    if (cfg.stage != "sft" or cfg.task != "causal_lm") and cfg.method not in ("lora", "dora"):
        what = "task: classification" if cfg.task != "causal_lm" else f"stage: {cfg.stage}"
        raise ConfigError(f"{what} trains an adapter (method: lora or dora), not method: {cfg.method}")
    if cfg.method == "full" and cfg.lora.init != "default":
        raise ConfigError(f"lora.init: {cfg.lora.init} initialises an adapter; method: full has none")
    per_step, group = cfg.training.batch_size * cfg.training.grad_accum, cfg.grpo.num_generations
    if cfg.stage == "grpo" and per_step % group:
        raise ConfigError(f"stage: grpo samples grpo.num_generations={group} answers per prompt, so training.batch_size x "
                          f"grad_accum ({per_step}) must be a multiple of it; e.g. training.batch_size={group}")
    if cfg.stage != "sft" and cfg.lora.init in ("pissa", "pissa_fast", "olora"):
        raise ConfigError(f"lora.init: {cfg.lora.init} changes the base weights, but stage: {cfg.stage} needs them intact "
                          "(the adapter-disabled model is its reference / starting point); use lora.init: default")


def train(cfg: TrainConfig | None = None, resume: str | Path | None = None, console=None):
    """Run the training a config describes (or resume a run); returns its RunDir."""
    if resume is not None:
        from ayar.train.rundir import RunDir

        run = RunDir.open(resume)
        cfg = from_dict(TrainConfig, run.read_config_dict(), where=str(run.config))
    check_combination(cfg)
    if cfg.task == "classification":
        from ayar.train.classify import STAGE
    elif cfg.stage == "sft":
        from ayar.train.sft import train_sft

        return train_sft(None if resume else cfg, resume=resume, console=console)
    else:
        STAGE = importlib.import_module(TRAINER_STAGES[cfg.stage]).STAGE
    from ayar.train.trainer_stage import run_stage

    return run_stage(None if resume else cfg, STAGE, resume=resume, console=console)
