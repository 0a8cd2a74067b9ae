"""Several trackers at once, each with the configured project and run name. W&B and MLflow are not installed
in the test environment: stand-ins record what ayar calls, with the libraries' own signatures."""

import sys
import types

import pytest

from ayar.errors import ConfigError
from ayar.rundir import RunDir
from ayar.training.tracking import Tracker
from tests.helpers import MATH_ROWS, tiny_train_config, write_jsonl


@pytest.fixture
def fake_trackers(monkeypatch):
    calls = []
    wandb = types.ModuleType("wandb")

    class WandbRun:
        def log(self, data, step=None):
            calls.append(("wandb.log", step, data))

        def finish(self):
            calls.append(("wandb.finish",))

    def init(project=None, name=None, dir=None, config=None):
        calls.append(("wandb.init", project, name))
        return WandbRun()

    wandb.init = init
    mlflow = types.ModuleType("mlflow")
    mlflow.set_experiment = lambda name: calls.append(("mlflow.experiment", name))
    mlflow.start_run = lambda run_name=None: calls.append(("mlflow.start", run_name))
    mlflow.log_params = lambda params: calls.append(("mlflow.params", params["training.learning_rate"]))
    mlflow.log_metrics = lambda metrics, step=None: calls.append(("mlflow.log", step, metrics))
    mlflow.end_run = lambda: calls.append(("mlflow.end",))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    return calls


def test_a_run_logs_to_every_tracker_with_its_project_and_name(tiny_model_dir, tmp_path, fake_trackers):
    from ayar.training.sft import train_sft

    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    cfg = tiny_train_config(
        tiny_model_dir, data, tmp_path / "runs", max_steps=2, tracker=["tensorboard", "wandb", "mlflow"]
    )
    cfg.training.project, cfg.training.run_name = "math-tuning", "r8-lr3e-2"
    run = train_sft(cfg).path
    assert ("wandb.init", "math-tuning", "r8-lr3e-2") in fake_trackers
    assert ("mlflow.experiment", "math-tuning") in fake_trackers and ("mlflow.start", "r8-lr3e-2") in fake_trackers
    for kind in ("wandb", "mlflow"):
        logged = [c[2] for c in fake_trackers if c[0] == f"{kind}.log"]
        assert [c[1] for c in fake_trackers if c[0] == f"{kind}.log"][:2] == [1, 2]
        assert all({"loss", "lr", "grad_norm"} <= set(m) for m in logged[:2]), logged
    assert ("wandb.finish",) in fake_trackers and ("mlflow.end",) in fake_trackers
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())


def test_the_run_name_defaults_to_the_run_directory(tmp_path, fake_trackers):
    run = RunDir(tmp_path / "run-20261202-010101")
    Tracker(["wandb"], run, {}).close()
    assert fake_trackers[0] == ("wandb.init", "ayar", "run-20261202-010101")


def test_a_missing_tracker_library_names_the_fix_and_closes_the_others(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    with pytest.raises(ConfigError, match="mlflow is not installed: `pip install mlflow`"):
        Tracker(["tensorboard", "mlflow"], RunDir(tmp_path), {})
