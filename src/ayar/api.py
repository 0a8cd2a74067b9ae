"""ayar's Python API: the commands as functions. `ayar train`, `ayar eval`, `ayar export` and `ayar plan` call the
same functions the CLI does; `import ayar` stays light (torch loads when a function runs).

    >>> import ayar
    >>> run = ayar.train("examples/quickstart.yaml", **{"training.max_steps": 10})
    >>> run.chat("What is 12 * 7?")
    >>> report = ayar.evaluate(run)
    >>> ayar.export(run, to="gguf").gate.ok

A config is a TrainConfig, a YAML path, or a dict shaped like the YAML; overrides are dotted keys
(`**{"lora.r": 8}`) or, as Python names, `section__key` (`lora__r=8`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Run:
    """A training run's directory: its config, run.json, metrics, adapter or model, and a chat with it."""

    path: Path
    _engine: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        from ayar.rundir import RunDir

        self.path = Path(self.path)
        self._dir = RunDir.open(self.path)

    @property
    def config(self):
        """The run's resolved TrainConfig."""
        return self._dir.read_config()

    @property
    def meta(self) -> dict:
        """run.json: base model, plan, data, results (final_loss, tokens_per_s, ...)."""
        return self._dir.read_meta()

    @property
    def metrics(self) -> list[dict]:
        """metrics.jsonl: one record per logged step and evaluation."""
        return self._dir.read_metrics()

    @property
    def adapter(self) -> Path:
        return self._dir.adapter

    def load(self):
        """The run as an Engine (infer/base.py), loaded once and kept."""
        if self._engine is None:
            from ayar.infer.load import load_engine

            self._engine = load_engine(self.path, log=lambda *_: None)
        return self._engine

    def chat(self, prompt: str | list[dict], **generation) -> str:
        """The run's answer to a prompt (or a list of chat messages); `generation` overrides preset,
        max_new_tokens, temperature, top_p, ..."""
        return self.load().generate(prompt, **generation).text


@dataclass
class Plan:
    """`ayar plan`'s answer: the memory plan, settings that would fit when it does not, the predicted layout."""

    memory: Any  # train.memory.MemoryPlan: parts, total, available, fits, table()
    fixes: list[str]
    layout: Any  # train.memory.Layout

    @property
    def fits(self) -> bool:
        return self.memory.fits


def configure(source=None, **overrides):
    """A validated TrainConfig from a TrainConfig, a YAML path, a dict shaped like the YAML, or None (defaults),
    with overrides applied. Bad keys or values are one ConfigError naming each (with a did-you-mean)."""
    import dataclasses

    from ayar.config import TrainConfig, config_to_dict, load_config
    from ayar.config.loader import apply_overrides, from_dict

    items = [f"{k.replace('__', '.')}={_yaml(v)}" for k, v in overrides.items()]
    if source is None or isinstance(source, (str, Path)):
        return load_config(source, items)
    if dataclasses.is_dataclass(source):
        source = config_to_dict(source)
    if isinstance(source, dict):
        return from_dict(TrainConfig, apply_overrides(source, items), where="dict")
    raise TypeError(f"config: expected a TrainConfig, a YAML path or a dict, got {type(source).__name__}")


def train(source=None, /, *, resume: str | Path | None = None, **overrides) -> Run:
    """Fine-tune as `ayar train` does (any stage: SFT, DPO family, reward, GRPO, classification) and return the
    Run. `resume`: continue that run directory from its last checkpoint (no config then)."""
    from ayar.training.dispatch import train as run_training

    if resume is not None:
        if source is not None or overrides:
            from ayar.errors import ConfigError

            raise ConfigError("resume continues a run with its saved config: give no config or overrides with it")
        return Run(run_training(resume=resume).path)
    return Run(run_training(configure(source, **overrides)).path)


def evaluate(run: Run | str | Path, data: str | None = None, **options):
    """Evaluate a run against its base model as `ayar eval` does; returns the EvalResult (models' metrics,
    samples, checks, verdict) and writes the report to RUN/eval (or `out=`). `options`: EvalConfig fields
    (max_rows, max_new_tokens, extract, anchor, ...)."""
    from ayar.config import EvalConfig
    from ayar.eval.runner import evaluate_run

    return evaluate_run(EvalConfig(run=str(_path(run)), data=data, **options))


def export(
    run: Run | str | Path,
    to: str = "merged",
    kind: str | None = None,
    out: str | Path | None = None,
    verify: bool = True,
    force: bool = False,
    max_new_tokens: int = 48,
    log=print,
):
    """Export a run (merged | onnx | gguf, in `kind`: a dtype or quantization) and put it through the release
    gate, as `ayar export` does. Returns the Export (folder, artifact, gate report; `.ok`)."""
    from ayar.exports.workflow import export_run

    return export_run(_path(run), to, kind, out, verify, max_new_tokens, log=log, force=force)


def plan(source=None, /, **overrides) -> Plan:
    """Predict a run's peak memory without loading weights, as `ayar plan` does."""
    from ayar.training.plan import plan_for_config

    memory, fixes, layout = plan_for_config(configure(source, **overrides), log=lambda *_: None)
    return Plan(memory, fixes, layout)


def load(source, **kwargs):
    """A model ready to answer: a run directory, an export (merged, ONNX, GGUF), a local model directory or
    `default`; returns an Engine (generate, stream, generate_batch)."""
    from ayar.infer.load import load_engine

    return load_engine(_path(source) if isinstance(source, Run) else source, **kwargs)


def create_app(source: str | Path | Run, **settings):
    """The OpenAI-compatible server's FastAPI app for a run or model (as `ayar serve`), for uvicorn or tests;
    `settings`: ServeSettings fields (api_keys, max_batch, ...)."""
    from ayar.serve.app import create_app as make_app
    from ayar.serve.settings import ServeSettings

    return make_app(ServeSettings(source=str(_path(source)), **settings))


def _path(run) -> Path:
    return run.path if isinstance(run, Run) else Path(run)


def _yaml(value) -> str:
    import json

    return json.dumps(value) if not isinstance(value, str) else value
