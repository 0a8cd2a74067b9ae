"""`ayar train`'s dispatch: a config's stage and task pick the runner. Combinations that cannot work were
refused when the config was loaded (config/validate.py), before anything loads."""

from __future__ import annotations

import importlib
from pathlib import Path

from ayar.config import TrainConfig

# stage -> module holding its `STAGE` (training/trl_stage.py runs it); sft has its own loop (training/sft.py)
TRAINER_STAGES = {
    "dpo": "ayar.training.preference",
    "reward": "ayar.training.reward_model",
    "grpo": "ayar.training.grpo",
    "classification": "ayar.training.classify",
}


def train(cfg: TrainConfig | None = None, resume: str | Path | None = None, console=None):
    """Run the training a config describes (or resume a run with its saved config, read once here); returns
    its RunDir."""
    if resume is not None:
        from ayar.rundir import RunDir

        cfg = RunDir.open(resume).read_config()
    stage = "classification" if cfg.task == "classification" else cfg.stage
    if stage == "sft":
        from ayar.training.sft import train_sft

        return train_sft(cfg, resume=resume, console=console)
    from ayar.training.trl_stage import run_stage

    return run_stage(cfg, importlib.import_module(TRAINER_STAGES[stage]).STAGE, resume=resume, console=console)
