"""ayar's Python API: the commands as functions. `ayar train`, `ayar eval`, `ayar export` and `ayar plan` call the
same functions the CLI does; `import ayar` stays light (torch loads when a function runs).

    >>> import ayar
    >>> run = ayar.train("examples/quickstart.yaml", **{"training.max_steps": 10})
    >>> run.chat("What is 12 * 7?")
    >>> report = ayar.evaluate(run)
    >>> ayar.export(run, to="gguf").gate.ok
    >>> ayar.lint("train.jsonl").errors                  # also ayar.preview, ayar.clean, ayar.convert

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


def configure(source=None, /, *, kind=None, **overrides):
    """A validated TrainConfig from a TrainConfig, a YAML path, a dict shaped like the YAML, or None (defaults),
    with overrides applied. Bad keys or values are one ConfigError naming each (with a did-you-mean). `kind`:
    another config class (RlaifConfig, EvalConfig) built the same way."""
    import dataclasses

    from ayar.config import TrainConfig, config_to_dict, load_config
    from ayar.config.loader import apply_overrides, from_dict

    kind = kind or TrainConfig
    items = [f"{k.replace('__', '.')}={_yaml(v)}" for k, v in overrides.items()]
    if source is None or isinstance(source, (str, Path)):
        return load_config(source, items, cls=kind)
    if dataclasses.is_dataclass(source):
        source = config_to_dict(source)
    if isinstance(source, dict):
        return from_dict(kind, apply_overrides(source, items), where="dict")
    raise TypeError(f"config: expected a {kind.__name__}, a YAML path or a dict, got {type(source).__name__}")


def train(source=None, /, *, resume: str | Path | None = None, nproc: int | str = 1, **overrides) -> Run:
    """Fine-tune as `ayar train` does (any stage: SFT, DPO family, reward, GRPO, classification) and return the
    Run. `resume`: continue that run directory from its last checkpoint (no config then). `nproc`: train in that
    many processes on this machine (one per GPU; `ayar train --nproc`, through torchrun; "auto": one per GPU), as
    `distributed.strategy` says; this process waits for them."""
    from ayar.training import launch
    from ayar.training.dispatch import train as run_training

    if resume is not None and (source is not None or overrides):
        from ayar.errors import ConfigError

        raise ConfigError("resume continues a run with its saved config: give no config or overrides with it")
    cfg = configure(source, **overrides) if resume is None else None
    nproc = launch.processes(nproc)
    if nproc > 1 and not launch.under_launcher():
        return Run(launch.train_in_processes(cfg, nproc, resume))
    return Run(run_training(cfg, resume=resume).path)


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


def plan(source=None, /, *, target=None, **overrides) -> Plan:
    """Predict a run's peak memory without loading weights, as `ayar plan` does. `target`: another machine,
    `ayar.training.plan.Target(device, memory per device in bytes, Sharding(nproc, strategy, offload))`."""
    from ayar.training.plan import plan_for_config

    memory, fixes, layout = plan_for_config(configure(source, **overrides), log=lambda *_: None, target=target)
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


# --- RLAIF: what `ayar rlaif` does ------------------------------------------------------------------------------


def rlaif(source=None, /, *, log=print, progress=None, **overrides) -> dict:
    """Run the RLAIF loop as `ayar rlaif` does (synthesize -> sft -> label -> dpo, the steps `steps` names) from
    an RlaifConfig, a YAML path or a dict; returns its state (per step: rows, skips with their reasons, the file
    or run directory, seconds). Rerunning continues where it stopped. `progress(step, total)`: returns a
    tick(n) callable, for a progress bar."""
    from ayar.config import RlaifConfig
    from ayar.rlaif.loop import run_rlaif

    return run_rlaif(configure(source, kind=RlaifConfig, **overrides), log=log, progress=progress)


def judge_agreement(
    pairs,
    /,
    *,
    judge_url: str | None = None,
    judge_model: str = "gpt-4o-mini",
    judge_key_env: str = "OPENAI_API_KEY",
    judge_local: str | None = None,
    constitution: str | None = None,
    max_pairs: int = 0,
    progress=None,
) -> dict:
    """How well a judge (an endpoint, or a local model or run) agrees with people on human-labelled preference
    pairs, asked in both orders (`ayar rlaif agreement`): agreement, decisive agreement, position consistency,
    tie rate, first-position rate, one row per pair."""
    from ayar.config import JudgeConfig
    from ayar.data.dataset import load_records
    from ayar.errors import DataError
    from ayar.rlaif.agreement import agreement
    from ayar.rlaif.constitution import load_constitution
    from ayar.rlaif.loop import make_judge

    records = [r for r in load_records(str(pairs)) if r.kind == "preference"]
    if not records:
        raise DataError(f"{pairs}: no preference pairs (rows with prompt, chosen, rejected; or hh rows)")
    judge = make_judge(JudgeConfig(url=judge_url, model=judge_model, key_env=judge_key_env, local=judge_local))
    try:
        records = records[:max_pairs] if max_pairs else records
        tick = progress("agreement", len(records)) if progress else None
        return agreement(records, judge, load_constitution(constitution), tick=tick)
    finally:
        if hasattr(judge, "close"):
            judge.close()


# --- data: what `ayar data lint|preview|clean|convert` do ------------------------------------------------------


def data_config(
    source=None,
    /,
    *,
    config=None,
    model: str | None = None,
    format: str | None = None,
    columns: dict | None = None,
    validation=None,
    max_length: int | None = None,
    template: str | None = None,
):
    """(DataConfig, model name) for the data functions: `source` (a spec, a `{path, ...}` mapping or a list of
    them, as `data.train`) and/or `config` (a training config whose data and model settings apply); the other
    arguments override either. Without a config, nothing is held out for validation."""
    from ayar.config.schema import DataConfig
    from ayar.errors import DataError

    if config is not None:
        cfg = configure(config)
        data, name = cfg.data, cfg.model.name
    elif source is None:
        raise DataError("give data (a file, folder, glob or sample:gsm8k) or a training config")
    else:
        data, name = DataConfig(val_ratio=0.0), configure().model.name
    if source is not None:
        items = [
            str(s) if isinstance(s, Path) else s for s in (source if isinstance(source, (list, tuple)) else [source])
        ]
        data.train = items if isinstance(source, (list, tuple)) else items[0]
    if isinstance(validation, Path):
        validation = str(validation)
    for key, value in (("format", format), ("columns", columns), ("validation", validation)):
        if value is not None:
            setattr(data, key, value)
    for key, value in (("max_length", max_length), ("template", template)):
        if value is not None:
            setattr(data, key, value)
    return data, model or name


def lint(source=None, /, **inputs):
    """The data checks `ayar train` runs first (`ayar data lint`): a LintReport with `errors`, `warnings`
    (each naming its row, e.g. `train.jsonl:12`), `format()` and `to_dict()`. `inputs`: see `data_config`."""
    from ayar.data.dataset import encode_and_lint, load_splits

    data, model = data_config(source, **inputs)
    return encode_and_lint(load_splits(data), _renderer(data, model), data.cache)[2]


def preview(source=None, /, *, n: int = 3, start: int = 0, html: str | Path | None = None, **inputs) -> list:
    """Rows `start` .. `start + n` rendered exactly as the model sees them (`ayar data preview`): Examples with
    `input_ids`, `labels` (-100 where a token is context only) and `where` (file:line); `html`: also write an
    HTML page with the trained tokens highlighted."""
    from ayar.data.dataset import load_splits
    from ayar.data.preview import write_html

    data, model = data_config(source, **inputs)
    renderer = _renderer(data, model)
    examples = [renderer.encode(r) for r in load_splits(data).train[start : start + n]]
    if html is not None:
        write_html(renderer.tok, examples, str(html))
    return examples


@dataclass
class Cleaned:
    """What `clean` wrote: the file, its format, the counts per rule (CleanReport) and the report file."""

    path: Path
    format: str
    report: Any
    report_path: Path


def clean(
    source=None,
    /,
    *,
    out: str | Path,
    to: str | None = None,
    force: bool = False,
    against=(),
    dedup: bool = True,
    near_dup: bool = True,
    near_threshold: float = 0.85,
    pii: bool = True,
    pii_names: bool = False,
    min_chars: int = 0,
    max_chars: int = 0,
    drop_empty: bool = True,
    **inputs,
) -> Cleaned:
    """Exact and near-duplicate removal, PII scrub and length filters into a new file `out` (in `to`, default
    the input's format) and `out.report.json` (`ayar data clean`). Inputs are never written; an existing
    `out` needs `force`. `against`: files whose rows are dropped from the output (e.g. the validation set)."""
    import json

    from ayar.data.clean import CleanOptions
    from ayar.data.clean import clean as run_clean
    from ayar.data.dataset import load_records
    from ayar.data.outputs import input_format, refuse_input_overwrite
    from ayar.data.writers import write_records

    data, _ = data_config(source, **inputs)
    refuse_input_overwrite(data, out, against, force)
    options = CleanOptions(
        dedup=dedup,
        near_dup=near_dup,
        near_threshold=near_threshold,
        pii=pii,
        pii_names=pii_names,
        min_chars=min_chars,
        max_chars=max_chars,
        drop_empty=drop_empty,
        against=[r for f in against for r in load_records(str(f), data.format, data.columns)],
    )
    cleaned, report = run_clean(_all_rows(data), options)
    fmt = to or input_format(data)
    path = write_records(cleaned, fmt, str(out))
    report_path = path.with_name(path.name + ".report.json")
    report_path.write_text(
        json.dumps({"input": data.train, "output": str(path), "format": fmt, **report.to_dict()}, indent=1)
    )
    return Cleaned(path, fmt, report, report_path)


def convert(source=None, /, *, to: str, out: str | Path, force: bool = False, **inputs) -> Path:
    """Every row of the input written in format `to` (alpaca, messages, sharegpt, completion, preference, hh,
    text, classification) to the new file `out` (`ayar data convert`); returns its path."""
    from ayar.data.outputs import refuse_input_overwrite
    from ayar.data.writers import write_records

    data, _ = data_config(source, **inputs)
    refuse_input_overwrite(data, out, (), force)
    return write_records(_all_rows(data), to, str(out))


def _all_rows(data) -> list:
    """Every row of the training sources, unsplit and unmixed (clean and convert keep all rows)."""
    from ayar.data.dataset import load_records, parse_sources

    return [r for src in parse_sources(data.train, data.format, data.columns) for r in load_records(src)]


def _renderer(data, model: str, log=None):
    from ayar.data.render import Renderer
    from ayar.models.load import load_tokenizer, resolve_model_path

    return Renderer.from_config(load_tokenizer(resolve_model_path(model, log=log or (lambda *_: None))), data)


def _path(run) -> Path:
    return run.path if isinstance(run, Run) else Path(run)


def _yaml(value) -> str:
    import json

    return json.dumps(value) if not isinstance(value, str) else value
