"""Where metrics go: metrics.jsonl always, plus TensorBoard (default), MLflow or W&B when installed."""

from __future__ import annotations

from ayar.errors import ConfigError


class Tracker:
    def __init__(self, kind: str, run, config: dict):
        self.kind, self._impl = kind, None
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._impl = SummaryWriter(str(run.tensorboard))
        elif kind == "mlflow":
            mlflow = _require("mlflow")
            mlflow.start_run(run_name=run.path.name)
            mlflow.log_params({k: v for k, v in _flatten(config).items() if v is not None})
            self._impl = mlflow
        elif kind == "wandb":
            wandb = _require("wandb")
            self._impl = wandb.init(project="ayar", name=run.path.name, dir=str(run.path), config=config)

    def log(self, metrics: dict, step: int) -> None:
        nums = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self.kind == "tensorboard":
            for k, v in nums.items():
                self._impl.add_scalar(k, v, step)
        elif self.kind == "mlflow":
            self._impl.log_metrics(nums, step=step)
        elif self.kind == "wandb":
            self._impl.log(nums, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self._impl.close()
        elif self.kind == "mlflow":
            self._impl.end_run()
        elif self.kind == "wandb":
            self._impl.finish()


def _require(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(
            f"training.tracker: {name} is not installed: `pip install {name}`, or use tracker: tensorboard"
        ) from None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if not isinstance(v, list) else ",".join(map(str, v))
    return out
