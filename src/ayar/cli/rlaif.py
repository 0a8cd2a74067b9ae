"""RLAIF / Constitutional AI: preference data from AI feedback under written principles, then SFT -> DPO.

examples:
  ayar rlaif examples/rlaif.yaml                        (synthesize -> sft -> label -> dpo, in rlaif.out)
  ayar rlaif examples/rlaif.yaml steps=[label] max_prompts=20
  ayar rlaif examples/rlaif.yaml judge.url=http://127.0.0.1:8001/v1 judge.model=judge-run
  ayar rlaif agreement --pairs sample:hh-heldout --judge-local default
  ayar rlaif agreement --pairs human.jsonl --judge-url https://api.openai.com/v1 --judge-model gpt-4o-mini

Each step writes a file or a run directory under `out`; rerunning the same command skips finished steps and
finishes a half-done one. `agreement` asks the judge to label pairs people already labelled (in both orders)
and reports agreement, position consistency and the tie rate: whether the judge is good enough to use.
"""

INTERMIXED = True  # options may come between the overrides


def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", help="rlaif YAML (see examples/rlaif.yaml), or `agreement`")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. max_prompts=20 judge.url=...")
    g = p.add_argument_group("agreement (ayar rlaif agreement ...)")
    g.add_argument("--pairs", help="human-labelled preference pairs (preference or hh rows)")
    g.add_argument("--judge-url", help="OpenAI-compatible base URL ending in /v1")
    g.add_argument("--judge-model", default="gpt-4o-mini", help="model name sent to the endpoint")
    g.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="variable holding the endpoint's API key")
    g.add_argument("--judge-local", help="a model or run directory to judge with locally instead")
    g.add_argument("--constitution", help="constitution YAML (default: ayar's own)")
    g.add_argument("--max-pairs", type=int, default=0, help="judge the first N pairs (0: all)")
    g.add_argument("--out", help="also write the result (with one row per pair) as JSON here")


def run(args) -> int:
    if args.config == "agreement":
        return _agreement(args)
    from ayar import api
    from ayar.cli import config_and_overrides
    from ayar.config import RlaifConfig, load_config

    config, overrides = config_and_overrides(args.config, args.overrides)
    cfg = load_config(config, overrides, cls=RlaifConfig)
    with _Bars() as bars:
        api.rlaif(cfg, log=bars.say, progress=bars.bar)
    return 0


def _agreement(args) -> int:
    import json

    from ayar import api
    from ayar.errors import AyarError
    from ayar.rlaif.agreement import format_report

    if not args.pairs:
        raise AyarError("ayar rlaif agreement needs --pairs FILE (human-labelled preference pairs)")
    with _Bars() as bars:
        result = api.judge_agreement(
            args.pairs,
            judge_url=args.judge_url,
            judge_model=args.judge_model,
            judge_key_env=args.judge_key_env,
            judge_local=args.judge_local,
            constitution=args.constitution,
            max_pairs=args.max_pairs,
            progress=bars.bar,
        )
    print(format_report(result))
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


class _Bars:
    """A rich progress bar per step (count, rate, ETA) with log lines above it."""

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True, highlight=False)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def say(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)

    def bar(self, name: str, total: int):
        task = self.progress.add_task(name, total=total)
        return lambda n: self.progress.advance(task, n)
