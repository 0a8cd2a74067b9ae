"""The run directory: the contract between `train` and everything after it (chat, eval, export, serve).

runs/<name>-<timestamp>/
  config.yaml      resolved config            run.json      base model, dtype, versions, results
  tokenizer/       tokenizer + chat template  adapter/      final adapter (safetensors)
                                              model/        the whole model instead (method: full)
  checkpoints/     resumable checkpoints      metrics.jsonl one JSON object per log/eval event
  loss.png         loss curves                README.md     what this run is and how to use it
  tb/              TensorBoard events
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ayar.errors import AyarError
from ayar.fsutil import write_atomic


@dataclass
class RunDir:
    path: Path

    config = property(lambda self: self.path / "config.yaml")
    meta = property(lambda self: self.path / "run.json")
    tokenizer = property(lambda self: self.path / "tokenizer")
    adapter = property(lambda self: self.path / "adapter")  # what plain peft loads onto the base model
    # a run chained from earlier runs: what this stage trained, on top of the base with their adapters merged
    stage_adapter = property(lambda self: self.path / "stage_adapter")
    start_model = property(lambda self: self.path / "start_model")  # that start, where adapter/ cannot be stacked
    trained_adapter = property(lambda self: self.stage_adapter if self.stage_adapter.is_dir() else self.adapter)
    full_model = property(lambda self: self.path / "model")  # method: full, the whole fine-tuned model
    checkpoints = property(lambda self: self.path / "checkpoints")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    loss_plot = property(lambda self: self.path / "loss.png")
    readme = property(lambda self: self.path / "README.md")
    tensorboard = property(lambda self: self.path / "tb")
    # a stop asked for (`ayar ui`'s Stop, or `touch RUN/STOP`): training checkpoints and ends at its next step
    stop_request = property(lambda self: self.path / "STOP")

    @classmethod
    def create_at(cls, path: str | Path) -> "RunDir":
        """The run directory at exactly `path` (`output.path`): new, or an empty folder; never one with files."""
        path = cls.check_new(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @staticmethod
    def check_new(path: str | Path) -> Path:
        """`path` as a new run directory: refused when it holds anything."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise AyarError(
                f"output.path {path} exists and is not an empty folder: ayar never writes a run over "
                "other files; choose a new path, or resume that run with `ayar train --resume`"
            )
        return path

    @classmethod
    def create(cls, parent: str, name: str) -> "RunDir":
        path = cls.new_path(parent, name)
        path.mkdir(parents=True)
        return cls(path)

    @staticmethod
    def new_path(parent: str | Path, name: str, taken=lambda path: False) -> Path:
        """PARENT/NAME-STAMP for a new run (-2, -3, ... when that exists or is `taken` already)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, n = Path(parent) / f"{name}-{stamp}", 1
        while path.exists() or taken(path):
            n += 1
            path = Path(parent) / f"{name}-{stamp}-{n}"
        return path

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        run = cls(Path(path))
        if not run.meta.is_file() or not run.config.is_file():
            raise AyarError(
                f"{path} is not an ayar run directory (no run.json/config.yaml): pass the directory `ayar train` "
                "printed"
            )
        return run

    def read_meta(self) -> dict:
        return json.loads(self.meta.read_text())

    def adapter_base(self) -> str:
        """The model the run's adapter applies to: its base, or for a chained run the model it started from."""
        meta = self.read_meta()
        return str(meta.get("adapter", {}).get("applies_to", meta.get("base_model")))

    def update_meta(self, **fields) -> dict:
        meta = self.read_meta() if self.meta.is_file() else {}
        meta.update(fields)
        write_atomic(self.meta, json.dumps(meta, indent=2, default=str))
        return meta

    def write_config(self, cfg_dict: dict) -> None:
        write_atomic(self.config, yaml.safe_dump(cfg_dict, sort_keys=False))

    def read_config_dict(self) -> dict:
        from ayar.config.loader import safe_yaml

        return safe_yaml(self.config.read_text(), str(self.config))

    def read_config(self):
        """The run's resolved TrainConfig (config.yaml), validated like any config."""
        from ayar.config import TrainConfig
        from ayar.config.loader import from_dict

        return from_dict(TrainConfig, self.read_config_dict(), where=str(self.config))

    def append_metrics(self, record: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        """The records of metrics.jsonl. A last line cut short (the process was killed while appending it) is
        dropped: it was never a complete record."""
        if not self.metrics.is_file():
            return []
        lines = [
            line for line in self.metrics.read_text(encoding="utf-8", errors="replace").split("\n") if line.strip()
        ]
        out = []
        for n, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                if n < len(lines) - 1:
                    raise AyarError(
                        f"{self.metrics}:{n + 1}: not a JSON record; the file was changed by hand?"
                    ) from None
        return out

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records past `after_step` (a resumed run re-logs them)."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        write_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))
