"""The skeleton every stage runner shares: open or resume a run, record how it starts, log metrics, finish
it (loss plot, run.json, README.md, the closing lines). A runner supplies only what differs: how it loads,
fits and saves (training/sft.py for ayar's own loop, training/trl_stage.py for transformers/TRL Trainers).

A run directory is created only once the data and model are ready, so a bad config leaves no empty run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from ayar.config import TrainConfig, config_to_dict
from ayar.fsutil import write_atomic
from ayar.rundir import RunDir
from ayar.training.plots import plot_loss
from ayar.training.tracking import Tracker


@dataclass
class Recipe:
    """One training run being set up, fitted and saved."""

    cfg: TrainConfig
    console: Console
    run: RunDir | None = None  # the resumed run, or the new one once `create` made it
    resuming: bool = False
    tracker: Tracker | None = None
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def open(cls, cfg: TrainConfig | None, resume: str | Path | None, console: Console | None = None) -> Recipe:
        """A new run of `cfg`, or the run at `resume` with its own saved config (`cfg`, when given, is that
        config as the caller already read it)."""
        console = console or Console(stderr=True)
        if resume is None:
            if cfg.output.path:
                RunDir.check_new(cfg.output.path)  # before minutes of loading, not after
            return cls(cfg, console)
        run = RunDir.open(resume)
        return cls(cfg or run.read_config(), console, run, resuming=True)

    def say(self, text: str) -> None:
        self.console.print(text, soft_wrap=True, highlight=False)

    def start_over(self) -> None:
        """A resumed run with no complete checkpoint (killed before its first one): train it again from the
        start, in the same directory."""
        self.say(f"resume {self.run.path} has no complete checkpoint yet: starting it over")
        self.resuming = False
        self.run.truncate_metrics(0)

    def create(self) -> RunDir:
        """The run directory (a new one with its config.yaml; a resumed run is already there)."""
        if self.run is None:
            out = self.cfg.output
            self.run = RunDir.create_at(out.path) if out.path else RunDir.create(out.dir, out.name)
            self.run.write_config(config_to_dict(self.cfg))
        return self.run

    def record_start(self, tok, model_path: str, plan, trainable: int, total: int, data: dict, **extra) -> None:
        """Tokenizer and run.json for a new run (a resumed run keeps what it recorded)."""
        self.say(f"params {trainable:,} trainable / {total:,} total ({100 * trainable / total:.3f}%)")
        if self.resuming:
            return
        tok.save_pretrained(self.run.tokenizer)
        self.run.update_meta(**start_meta(self.cfg, model_path, plan, trainable, total, data), **extra)

    def open_tracker(self) -> Tracker:
        self.tracker = Tracker(self.cfg.training.tracker, self.run, config_to_dict(self.cfg))
        return self.tracker

    def log(self, record: dict) -> None:
        """One metrics record: metrics.jsonl and the tracker."""
        self.run.append_metrics(record)
        self.tracker.log(record, record["step"])

    def finish(self, readme, **results) -> dict:
        """Close the tracker, plot the losses, complete run.json with `results` and the final losses, write
        README.md (`readme(run, cfg, meta)`); returns run.json's contents."""
        if self.tracker is not None:
            self.tracker.close()
        records = self.run.read_metrics()
        plot_loss(records, self.run.loss_plot)
        fallback = results.pop("fallback_loss", None)  # a Trainer's own mean loss, where no step was logged
        final_loss = next((r["loss"] for r in reversed(records) if "loss" in r), fallback)
        meta = self.run.update_meta(
            status="completed",
            final_loss=final_loss,
            final_eval_loss=next((r["eval_loss"] for r in reversed(records) if r.get("eval_loss") is not None), None),
            **results,
            peak_rss_mb=peak_rss_mb(),
        )
        write_atomic(self.run.readme, readme(self.run, self.cfg, meta))
        return meta


def loading_snippets(run: RunDir, cfg: TrainConfig, meta: dict) -> str:
    """How to load this run elsewhere: transformers + peft, vLLM, llama.cpp (run README.md)."""
    base, where = meta["base_model"], run.path.resolve()
    if cfg.method == "full":
        return (
            f"Load it elsewhere (the whole model is in `model/`):\n\n```python\nfrom transformers import "
            f'AutoModelForCausalLM, AutoTokenizer\nmodel = AutoModelForCausalLM.from_pretrained("{where}/model")\n'
            f'tok = AutoTokenizer.from_pretrained("{where}/model")\n```\n\n'
            f"vLLM: `vllm serve {where}/model`. llama.cpp / Ollama: `ayar export {where} --to gguf` "
            "(with a Modelfile).\n"
        )
    if meta.get("merged_adapters"):
        return (
            f"This adapter was trained on `{base}` with earlier run(s) merged in "
            f"({', '.join(meta['merged_adapters'])}):\n"
            "it does not apply to the base alone. Load the whole model from a merged export instead:\n\n"
            f"    ayar export {where} --to merged    (then transformers / vLLM on that folder)\n"
            f"    ayar export {where} --to gguf      (llama.cpp / Ollama)\n"
        )
    return (
        "Load it elsewhere (the adapter's folder holds the tokenizer too):\n\n```python\nfrom peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
        f'model = PeftModel.from_pretrained(base, "{where}/adapter")\n'
        f'tok = AutoTokenizer.from_pretrained("{where}/adapter")\n```\n\n'
        f"vLLM: `vllm serve {base} --enable-lora --lora-modules {run.path.name}={where}/adapter`.\n"
        f"llama.cpp / Ollama: `ayar export {where} --to gguf` (the adapter merged in, with a Modelfile).\n"
    )


def start_meta(cfg, model_path: str, plan, trainable: int, total: int, data: dict) -> dict:
    """What run.json says about a run when it starts (any stage): where its model came from, how it runs."""
    import platform

    import peft
    import torch
    import transformers

    from ayar.models.load import starting_point
    from ayar.version import __version__

    return dict(
        ayar_version=__version__,
        status="running",
        base_model=model_path,
        model_name=cfg.model.name,
        merged_adapters=starting_point(cfg.model.name)[1],
        method=cfg.method,
        stage=cfg.stage,
        task=cfg.task,
        device=plan.device,
        dtype=plan.placement.dtype_name,
        dtype_reason=plan.placement.reason,
        plan=plan.summary(),
        **({"passes": plan.passes()} if plan.layout is not None else {}),
        params={"trainable": trainable, "total": total},
        data=data,
        versions={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
