"""Hyperparameter search (`ayar hpo`): optuna over a space declared in the config's `hpo:` section.

Each trial is an ordinary `ayar train` run (its own run directory under OUT/trials/) with the trial's values
as overrides; its objective is the best eval loss. Trials whose eval loss falls behind the median of earlier
trials at the same step are pruned. The study lives in OUT/study.db (SQLite), so a second invocation resumes
it: finished trials are kept, interrupted ones are re-run with their values.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from ayar.config import HpoConfig, TrainConfig, config_to_dict
from ayar.config.loader import apply_overrides, from_dict, read_yaml
from ayar.errors import ConfigError


def load_hpo_config(path, overrides: list[str] = (), trials: int | None = None) -> tuple[dict, HpoConfig]:
    """A training YAML with an `hpo:` section -> (the training config as a dict, the HpoConfig). Overrides
    starting with `hpo.` go to the search, the others to training; the space is checked against the config."""
    raw = read_yaml(path)
    search = raw.pop("hpo", None) or {}
    if not isinstance(search, dict):
        raise ConfigError(f"{path}: `hpo:` must be a section (trials:, space:, ...)")
    mine = [o for o in overrides if o.startswith("hpo.")]
    search = apply_overrides(search, [o.removeprefix("hpo.") for o in mine])
    if trials is not None:
        search["trials"] = trials
    hcfg = from_dict(HpoConfig, search, where=f"{path} (hpo:)")
    base = apply_overrides(raw, [o for o in overrides if o not in mine])
    from_dict(TrainConfig, base, where=str(path))
    parse_space(hcfg.space, base)
    return base, hcfg


@dataclass
class Param:
    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list | None = None

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.key, self.choices)
        if isinstance(self.low, int) and isinstance(self.high, int) and not self.log:
            return trial.suggest_int(self.key, self.low, self.high)
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log)

    def sample(self):
        return self.choices[0] if self.choices is not None else self.low


def parse_space(space: dict, base: dict) -> list[Param]:
    """hpo.space -> Params, each key checked against the training config (did-you-mean on typos)."""
    if not space:
        raise ConfigError(
            "hpo.space is empty: declare what to search, e.g. `training.learning_rate: "
            "{low: 1e-5, high: 1e-3, log: true}`"
        )
    params = []
    for key, spec in space.items():
        where = f"hpo.space.{key}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: give {{low: .., high: ..}} or {{choices: [..]}}, not {spec!r}")
        unknown = set(spec) - {"low", "high", "log", "choices"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; use low, high, log or choices")
        if "choices" in spec:
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ConfigError(f"{where}.choices: give a non-empty list")
            param = Param(key, choices=spec["choices"])
        else:
            low, high = spec.get("low"), spec.get("high")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
                raise ConfigError(f"{where}: needs numbers low < high, got low={low!r} high={high!r}")
            if spec.get("log") and low <= 0:
                raise ConfigError(f"{where}: log: true needs low > 0")
            param = Param(key, low, high, bool(spec.get("log")))
        params.append(param)
    # every key must exist and accept its values: build the config once at each end of the space
    for pick in (lambda p: p.sample(), lambda p: p.choices[-1] if p.choices else p.high):
        from_dict(TrainConfig, apply_overrides(base, [f"{p.key}={_yaml(pick(p))}" for p in params]), where="hpo.space")
    return params


def run_hpo(base: dict, hcfg: HpoConfig, log=print) -> dict:
    """Run (or resume) the study; write the table, best.yaml and plots. Returns the summary."""
    import optuna

    from ayar.training.sft import train_sft

    params = parse_space(hcfg.space, base)
    cfg0 = from_dict(TrainConfig, base, where="config")
    if cfg0.data.val_ratio <= 0 and not cfg0.data.validation:
        raise ConfigError("ayar hpo optimizes eval loss: give data.validation or data.val_ratio > 0")
    if cfg0.stage != "sft" or cfg0.task != "causal_lm":
        raise ConfigError("ayar hpo searches stage: sft, task: causal_lm runs (its objective is the eval loss)")
    out = Path(hcfg.out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (
        optuna.samplers.TPESampler(seed=hcfg.seed)
        if hcfg.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=hcfg.seed)
    )
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
        if hcfg.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        study_name=hcfg.study,
        storage=f"sqlite:///{(out / 'study.db').resolve()}",
        direction="minimize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    _requeue_interrupted(study, log)
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    todo = max(0, hcfg.trials - len(done))
    log(f"hpo    study {hcfg.study} in {out / 'study.db'}: {len(done)} trials done, {todo} to run")

    def objective(trial) -> float:
        values = {p.key: p.suggest(trial) for p in params}
        log(f"trial  {trial.number}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
        overrides = [f"{k}={_yaml(v)}" for k, v in values.items()] + [
            f"output.dir={out / 'trials'}",
            f"output.name=trial-{trial.number:03d}",
            "output.path=null",  # each trial its own directory, whatever the base config names
        ]
        cfg = from_dict(TrainConfig, apply_overrides(base, overrides), where=f"trial {trial.number}")

        def report(state) -> None:  # after every step: report a fresh eval loss, stop the trial if it lags
            if state.last_eval_step == state.step and state.last_eval is not None:
                trial.report(state.last_eval, state.step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"eval loss {state.last_eval:.4f} at step {state.step}")

        run = train_sft(cfg, callbacks=[report])
        trial.set_user_attr("run", str(run.path))
        meta = run.read_meta()
        loss = meta.get("best_eval_loss") or meta.get("final_eval_loss")
        if loss is None or not math.isfinite(loss):
            raise optuna.TrialPruned("no finite eval loss")
        return loss

    if todo:
        study.optimize(objective, n_trials=todo, catch=())
    summary = write_results(study, params, base, out)
    log((out / "trials.md").read_text())
    log(
        f"best   trial {summary['best_trial']}: eval loss {summary['best_value']:.4f} -> {out / 'best.yaml'}  "
        f"(ayar train {out / 'best.yaml'})"
    )
    return summary


def _requeue_interrupted(study, log) -> None:
    """Trials left RUNNING by an interrupted invocation: mark them failed and queue their values again."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, skip_if_exists=False)
        log(f"hpo    trial {t.number} was interrupted: re-queued with the same values")


def write_results(study, params: list[Param], base: dict, out: Path) -> dict:
    import optuna

    trials = [t for t in study.trials if t.state != optuna.trial.TrialState.FAIL]
    rows = [
        {
            "trial": t.number,
            "state": t.state.name.lower(),
            "eval_loss": t.value,
            **t.params,
            "steps": max(t.intermediate_values, default=None) if t.state == optuna.trial.TrialState.PRUNED else None,
            "run": t.user_attrs.get("run"),
        }
        for t in trials
    ]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ConfigError("no trial completed (all pruned or failed); widen hpo.space or use hpo.pruner: none")
    best = study.best_trial
    keys = [p.key for p in params]
    head = "| trial | state | eval loss | " + " | ".join(keys) + " |\n|" + "---|" * (3 + len(keys)) + "\n"
    body = "".join(
        f"| {r['trial']}{' (best)' if r['trial'] == best.number else ''} | {r['state']} | "
        f"{'n/a' if r['eval_loss'] is None else format(r['eval_loss'], '.4f')} | "
        + " | ".join(_short(r.get(k)) for k in keys)
        + " |\n"
        for r in rows
    )
    (out / "trials.md").write_text(head + body)
    best_cfg = from_dict(
        TrainConfig, apply_overrides(base, [f"{k}={_yaml(v)}" for k, v in best.params.items()]), where="best"
    )
    (out / "best.yaml").write_text(
        f"# ayar hpo: best of {len(trials)} trials (trial {best.number}, eval loss {best.value:.4f})\n"
        + yaml.safe_dump(config_to_dict(best_cfg), sort_keys=False)
    )
    summary = {"best_trial": best.number, "best_value": best.value, "best_params": best.params, "trials": rows}
    (out / "trials.json").write_text(json.dumps(summary, indent=1, default=str))
    summary["plots"] = _plots(study, out / "plots", len(keys))
    return summary


def _plots(study, folder: Path, n_params: int) -> list[str]:
    """optuna's plots: PNG (matplotlib) and interactive HTML (plotly; plotly.min.js written once beside them, so
    they open offline)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_png

    folder.mkdir(exist_ok=True)
    names = ["optimization_history", "slice", "parallel_coordinate", "intermediate_values"]
    complete = sum(t.state.name == "COMPLETE" for t in study.trials)
    if n_params > 1 and complete > 1:
        names.append("param_importances")
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
        for name in names:
            getattr(vis, f"plot_{name}")(study).write_html(str(folder / f"{name}.html"), include_plotlyjs="directory")
            getattr(vis_png, f"plot_{name}")(study)
            plt.gcf().savefig(folder / f"{name}.png", dpi=90, bbox_inches="tight")
            plt.close("all")
            written += [f"{name}.html", f"{name}.png"]
    return written


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _short(value) -> str:
    return "" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)
