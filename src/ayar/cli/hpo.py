"""Search hyperparameters with optuna: each trial is a training run; the best config is written out.

examples:
  ayar hpo examples/hpo.yaml
  ayar hpo examples/hpo.yaml --trials 16            (resumes the study in hpo.out, runs the rest)
  ayar hpo examples/hpo.yaml hpo.out=runs/hpo2 training.max_steps=20

The YAML is a training config plus an `hpo:` section (see `ayar config reference`):
  hpo:
    trials: 8
    space:
      training.learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}
      lora.r: {choices: [8, 16, 32]}
Writes OUT/study.db (resumable), OUT/trials/ (one run directory per trial), OUT/trials.md and .json,
OUT/best.yaml (ready for `ayar train`) and OUT/plots/ (PNG and HTML).
"""


def add_arguments(p) -> None:
    p.add_argument("config", help="training YAML with an `hpo:` section")
    p.add_argument("overrides", nargs="*", help="dotted overrides: hpo.* for the search, the rest for training")
    p.add_argument("--trials", type=int, help="trials in total (overrides hpo.trials)")


def run(args) -> int:
    from ayar.config import HpoConfig
    from ayar.config.loader import apply_overrides, from_dict, read_yaml
    from ayar.errors import ConfigError
    from ayar.train.hpo import run_hpo

    raw = read_yaml(args.config)
    search = raw.pop("hpo", None) or {}
    if not isinstance(search, dict):
        raise ConfigError(f"{args.config}: `hpo:` must be a section (trials:, space:, ...)")
    mine = [o for o in args.overrides if o.startswith("hpo.")]
    search = apply_overrides(search, [o.removeprefix("hpo.") for o in mine])
    if args.trials is not None:
        search["trials"] = args.trials
    hcfg = from_dict(HpoConfig, search, where=f"{args.config} (hpo:)")
    base = apply_overrides(raw, [o for o in args.overrides if o not in mine])
    run_hpo(base, hcfg)
    return 0

