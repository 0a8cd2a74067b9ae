"""`ayar <command>`: each command is a module in this package, imported only when it runs.

A command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`, and keeps
heavy imports (torch, transformers) inside `run`, so `ayar --help` and `ayar <cmd> --help` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ayar.version import __version__

# name -> (module, one-line help). The one list of commands.
COMMANDS = {
    "train": (
        "ayar.cli.train",
        "Fine-tune a model from a YAML config (SFT, DPO family, reward, GRPO, classification); resume a run.",
    ),
    "compare": ("ayar.cli.compare", "Train one config with several methods (LoRA, DoRA, ...) and compare them."),
    "hpo": ("ayar.cli.hpo", "Search hyperparameters (optuna): trials as training runs, best config written out."),
    "rlaif": (
        "ayar.cli.rlaif",
        "Preference data from AI feedback under a constitution, then SFT -> DPO; judge agreement with people.",
    ),
    "data": ("ayar.cli.data", "Inspect, lint, preview, clean and convert training data."),
    "eval": ("ayar.cli.eval", "Evaluate a run against its base model (or a model alone): metrics, checks, report."),
    "export": ("ayar.cli.export", "Export a run as a merged model and verify it behaves like the run (release gate)."),
    "bench": ("ayar.cli.bench", "Benchmark ayar against the plain alternative (TRL), same run, as ratios."),
    "plan": ("ayar.cli.plan", "Predict a training run's peak memory and whether it fits (before training)."),
    "chat": ("ayar.cli.chat", "Chat with a run directory or model (interactive, or one-shot with --prompt)."),
    "serve": ("ayar.cli.serve", "Serve a run or model over an OpenAI-compatible API (streaming, adapters, users)."),
    "ui": ("ayar.cli.ui", "The web UI (gradio): train, watch runs, chat, evaluate, export and serve in a browser."),
    "config": ("ayar.cli.config", "Validate a config, show it resolved, or print the config reference."),
}


def config_and_overrides(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`ayar CMD [CONFIG] [key=value ...]`: a first argument that is an override, not a file, starts the overrides."""
    from pathlib import Path

    overrides = list(overrides)
    if config and "=" in config and not Path(config).is_file():
        return None, [config] + overrides
    return config, overrides


def _top_help() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return (
        f"usage: ayar <command> [options]\n\nayar {__version__}: fine-tune language models on your data.\n\n"
        f"commands:\n{rows}\n\nRun `ayar <command> --help` for a command's options."
    )


def parse(name: str, argv: list[str]):
    """`ayar NAME ARGV...`: the command's module and its parsed arguments (`argv`: as typed, which a launcher re-runs
    in each process). A command whose module sets INTERMIXED takes its options between its overrides
    (`ayar plan cfg.yaml --nproc 2 lora.r=8`), which argparse otherwise reads as the overrides' end."""
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(
        prog=f"ayar {name}", description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    module.add_arguments(parser)
    args = (parser.parse_intermixed_args if getattr(module, "INTERMIXED", False) else parser.parse_args)(argv)
    args.argv = argv
    return module, args


def _launchers_local_rank(argv: list[str]) -> list[str]:
    """`argv` without the `--local_rank=N` the DeepSpeed launcher (`deepspeed --module ayar train ...`) and torch's
    old `torch.distributed.launch` put before the command: the process's rank on its machine, LOCAL_RANK in the
    environment (which they set too) for ayar."""
    out, it = [], iter(argv)
    for a in it:
        if a.split("=", 1)[0] in ("--local_rank", "--local-rank"):
            value = a.split("=", 1)[1] if "=" in a else next(it, "0")
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _launchers_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"ayar {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        import difflib

        guess = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"ayar: unknown command {name!r}" + (f"; did you mean {guess[0]!r}?" if guess else ""), file=sys.stderr)
        print(_top_help(), file=sys.stderr)
        return 2
    module, args = parse(name, argv[1:])
    from ayar.errors import AyarError, SaidElsewhere
    from ayar.quiet import quiet_libraries

    quiet_libraries()
    try:
        return int(module.run(args) or 0)
    except AyarError as e:
        if isinstance(e, SaidElsewhere):  # rank 0 says it (several processes: training/distributed.py)
            import time

            time.sleep(10)  # ending first would have the launcher stop rank 0 before it has said why
            return 2
        rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
        print(("" if rank == "0" else f"[rank {rank}] ") + f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
