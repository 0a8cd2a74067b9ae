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

INTERMIXED = True  # options may come between the overrides


def add_arguments(p) -> None:
    p.add_argument("config", help="training YAML with an `hpo:` section")
    p.add_argument("overrides", nargs="*", help="dotted overrides: hpo.* for the search, the rest for training")
    p.add_argument("--trials", type=int, help="trials in total (overrides hpo.trials)")


def run(args) -> int:
    from ayar.training.hpo import load_hpo_config, run_hpo

    base, hcfg = load_hpo_config(args.config, args.overrides, trials=args.trials)
    run_hpo(base, hcfg)
    return 0
