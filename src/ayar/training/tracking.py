"""Where metrics go: metrics.jsonl always, plus any of TensorBoard (default), MLflow and W&B, at once."""

from __future__ import annotations

from ayar.config.loader import dotted
from ayar.errors import ConfigError


class _TensorBoard:
    def __init__(self, run, config: dict, project: str, name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.tensorboard))

    def log(self, nums: dict, step: int) -> None:
        for k, v in nums.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run, config: dict, project: str, name: str):
        self.mlflow = _require("mlflow")
        self.mlflow.set_experiment(project)
        self.mlflow.start_run(run_name=name)
        self.mlflow.log_params({k: _param(v) for k, v in dotted(config).items() if v is not None})

    def log(self, nums: dict, step: int) -> None:
        self.mlflow.log_metrics(nums, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _Wandb:
    def __init__(self, run, config: dict, project: str, name: str):
        self.run = _require("wandb").init(project=project, name=name, dir=str(run.path), config=config)

    def log(self, nums: dict, step: int) -> None:
        self.run.log(nums, step=step)

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}


def tracker_names(setting: str | list) -> list[str]:
    """`training.tracker` (a name or a list of names; `none` or [] for none) as a list of backend names."""
    names = [setting] if isinstance(setting, str) else list(setting or [])
    return [n for n in dict.fromkeys(names) if n != "none"]


class Tracker:
    """Every configured tracker, logged to together. `project`: the W&B project / MLflow experiment;
    `name`: the run's name in them (default: the run directory's name)."""

    def __init__(self, setting: str | list, run, config: dict, project: str = "ayar", name: str | None = None):
        self.backends = []
        try:
            for kind in tracker_names(setting):
                self.backends.append(BACKENDS[kind](run, config, project or "ayar", name or run.path.name))
        except BaseException:
            self.close()
            raise

    def log(self, metrics: dict, step: int) -> None:
        nums = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        for backend in self.backends:
            backend.log(nums, step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []


def _require(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(
            f"training.tracker: {name} is not installed: `pip install {name}`, or use tracker: tensorboard"
        ) from None


def _param(value):
    return ",".join(map(str, value)) if isinstance(value, list) else value
