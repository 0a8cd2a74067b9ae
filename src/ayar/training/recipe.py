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
from ayar.training import distributed
from ayar.training.allocator import (
    peak_rss_mb,
    setup_peak_rss_mb,
    start_of_setup,
    start_of_training,
    training_peak_rss_mb,
)
from ayar.training.distributed import World
from ayar.training.launch import from_accelerate_launch
from ayar.training.plan import launcher_world
from ayar.training.plots import plot_loss
from ayar.training.tracking import Tracker


def peaks_per_rank(world: World) -> dict:
    """Every process's peak RSS for run.json (the process's and training's own, `training_peak_rss_mb`: what the
    memory planner predicts per process); nothing in one process. Collective: every rank calls it."""
    if not world.active:
        return {}
    peaks = distributed.gather(world, (peak_rss_mb(), training_peak_rss_mb()))
    return {
        "peak_rss_mb_per_rank": [round(whole) for whole, _ in peaks],
        "training_peak_rss_mb_per_rank": [None if t is None else round(t) for _, t in peaks],
    }


@dataclass
class Recipe:
    """One training run being set up, fitted and saved."""

    cfg: TrainConfig
    console: Console
    run: RunDir | None = None  # the resumed run, or the new one once `create` made it
    resuming: bool = False
    tracker: Tracker | None = None
    started: float = field(default_factory=time.perf_counter)
    world: World = field(default_factory=World)  # several processes: only rank 0 writes, logs and prints

    def __post_init__(self) -> None:
        start_of_setup()

    @classmethod
    def open(cls, cfg: TrainConfig | None, resume: str | Path | None, console: Console | None = None) -> Recipe:
        """A new run of `cfg`, or the run at `resume` with its own saved config (`cfg`, when given, is that
        config as the caller already read it)."""
        console = console or Console(stderr=True)
        run = None if resume is None else RunDir.open(resume)
        cfg, notes = from_accelerate_launch(cfg or run.read_config(), resuming=run is not None)
        if launcher_world()[1] == 0:
            for line in notes:
                console.print(line, soft_wrap=True, highlight=False)
        if run is None:
            if cfg.output.path:
                RunDir.check_new(cfg.output.path)  # before minutes of loading, not after
            return cls(cfg, console)
        run.stop_request.unlink(missing_ok=True)  # resuming a stopped run is asking it to go on
        return cls(cfg, console, run, resuming=True)

    def say(self, text: str) -> None:
        if self.world.main:
            self.console.print(text, soft_wrap=True, highlight=False)

    def start_over(self) -> None:
        """A resumed run with no complete checkpoint (killed before its first one): train it again from the
        start, in the same directory."""
        self.say(f"resume {self.run.path} has no complete checkpoint yet: starting it over")
        self.resuming = False
        self.run.truncate_metrics(0)

    def load_model(self, plan, **kwargs):
        """The run's model and tokenizer as the plan says (models/load.py `load_model_and_tokenizer`; `kwargs` go to
        it): the base in 4-bit NF4 for QLoRA/QDoRA; rank 0 first (it converts the default model once, the others then
        read it; a 4-bit base only rank 0 reads is then described to the others); where ZeRO-3 builds the model split
        as it loads (collective: every process takes part in each layer), all together, once rank 0 has converted
        it."""
        from ayar.models.adapters import quantization_config
        from ayar.models.load import load_model_and_tokenizer, resolve_model_path, starting_point
        from ayar.training import zero

        if plan.quantized:
            storage = plan.load_placement.dtype if plan.splits_weights else None
            kwargs["quantization_config"] = quantization_config(self.cfg.method, plan.placement.dtype, storage)

        def load():
            empty = not plan.reads_weights
            return load_model_and_tokenizer(self.cfg.model, plan.load_placement, log=self.say, empty=empty, **kwargs)

        if not plan.splits_while_loading:
            with distributed.main_first(self.world):
                loaded = load()
            if plan.quantized and plan.rank0_loading:
                from ayar.training.sharding import four_bit_from_rank0

                four_bit_from_rank0(loaded[0], plan.rank)
            return loaded
        with distributed.main_first(self.world):
            resolve_model_path(starting_point(self.cfg.model.name)[0], log=self.say)
        with zero.split_while_loading(plan, self.cfg.training):
            return load()

    def create(self) -> RunDir:
        """The run directory (a new one with its config.yaml; a resumed run is already there). With several
        processes rank 0 makes it and the others learn its path."""
        if self.run is None:
            if self.world.main:
                out = self.cfg.output
                self.run = RunDir.create_at(out.path) if out.path else RunDir.create(out.dir, out.name)
                self.run.write_config(config_to_dict(self.cfg))
            self.run = RunDir(Path(distributed.share(self.world, str(self.run.path) if self.run else None)))
        return self.run

    def record_start(self, tok, model_path: str, plan, trainable: int, total: int, data: dict, **extra) -> None:
        """Tokenizer and run.json for a new run (a resumed run keeps what it recorded)."""
        self.say(f"params {trainable:,} trainable / {total:,} total ({100 * trainable / total:.3f}%)")
        if not self.world.main:
            return
        if self.resuming:
            self.run.update_meta(status="running")
            return
        tok.save_pretrained(self.run.tokenizer)
        self.run.update_meta(**start_meta(self.cfg, model_path, plan, trainable, total, data), **extra)

    def begin_fit(self) -> Tracker:
        """Setup is over: training's own peak memory is measured from here (run.json `training_peak_rss_mb`), and the
        tracker opens."""
        start_of_training()
        t = self.cfg.training
        kinds = t.tracker if self.world.main else "none"
        self.tracker = Tracker(kinds, self.run, config_to_dict(self.cfg), t.project, t.run_name)
        return self.tracker

    def stop_requested(self) -> bool:
        """Whether RUN/STOP exists (rank 0 looks; every rank gets its answer, so all stop at the same step)."""
        asked = self.world.main and self.run is not None and self.run.stop_request.exists()
        return bool(distributed.total(self.world, float(asked)))

    def finish_stopped(self, step: int, total_steps: int) -> None:
        """A run stopped on request after its checkpoint: run.json says so and how to continue."""
        if self.tracker is not None:
            self.tracker.close()
        if not self.world.main:
            return
        self.run.stop_request.unlink(missing_ok=True)
        self.run.update_meta(status="stopped", steps=step, total_steps=total_steps)
        self.say(f"stopped at step {step} of {total_steps}, checkpoint saved: ayar train --resume {self.run.path}")

    def log(self, record: dict) -> None:
        """One metrics record: metrics.jsonl and the tracker (rank 0's)."""
        if not self.world.main:
            return
        self.run.append_metrics(record)
        self.tracker.log(record, record["step"])

    def save(self, model, tok, init_dir=None, state_dict: dict | None = None) -> Path:
        """Save what was trained where plain transformers / peft load it, with the tokenizer beside it
        (safetensors, atomically). A run that started from earlier runs (their adapters merged into its base
        in memory, e.g. DPO after SFT) keeps what it trained in stage_adapter/ and writes to adapter/ one
        adapter that applies to the original base alone (the earlier ones stacked in); where stacking would
        not be exact it saves that merged start to start_model/ and points adapter/ at it. Either way
        `PeftModel.from_pretrained(<base named in adapter_config.json>, adapter/)` is the run's model.
        `state_dict`: the trained weights gathered whole, for a model split across processes (FSDP)."""
        from ayar.models.adapters import save_trained

        if self.cfg.method == "full":
            save_trained(model, self.run.full_model, init_dir, state_dict)
            tok.save_pretrained(self.run.full_model)
            return self.run.full_model
        meta = self.run.read_meta()
        earlier = meta.get("merged_adapters") or []
        if not earlier:
            save_trained(model, self.run.adapter, init_dir, state_dict)
            tok.save_pretrained(self.run.adapter)
            return self.run.adapter
        save_trained(model, self.run.stage_adapter, init_dir)
        tok.save_pretrained(self.run.stage_adapter)
        self.run.update_meta(adapter=self._stack_or_point(model, [*earlier, str(self.run.stage_adapter)], meta))
        tok.save_pretrained(self.run.adapter)
        return self.run.adapter

    def _stack_or_point(self, model, adapters: list[str], meta: dict) -> dict:
        import json
        import shutil

        from ayar.fsutil import atomic_directory
        from ayar.models.adapters import stack_adapters, stackable

        base = meta["base_model"]
        why_not = stackable(adapters)
        if why_not is None:
            stack_adapters(model, adapters, self.run.adapter, base)
            self.say(f"adapter {self.run.adapter}: {len(adapters)} adapters stacked into one that applies to {base}")
            return {"applies_to": base, "stacked": adapters}
        self.say(f"adapter cannot be stacked ({why_not}): saving the model it starts from to {self.run.start_model}")
        _save_start_model(base, adapters[:-1], self.run.start_model, self.cfg)
        with atomic_directory(self.run.adapter, fsync=True) as tmp:
            shutil.copytree(self.run.stage_adapter, tmp, dirs_exist_ok=True)
            cfg_file = tmp / "adapter_config.json"
            config = json.loads(cfg_file.read_text())
            config["base_model_name_or_path"] = str(self.run.start_model.resolve())
            cfg_file.write_text(json.dumps(config, indent=2, sort_keys=True))
        return {"applies_to": str(self.run.start_model.resolve()), "not_stacked": why_not}

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
            setup_peak_rss_mb=setup_peak_rss_mb(),
            training_peak_rss_mb=training_peak_rss_mb(),
        )
        write_atomic(self.run.readme, readme(self.run, self.cfg, meta))
        return meta


def _save_start_model(base: str, adapters: list[str], out: Path, cfg: TrainConfig) -> None:
    """The model a chained run started from (`base` with `adapters` merged), in the base's own dtype."""
    from transformers import AutoModelForCausalLM

    from ayar.fsutil import atomic_directory
    from ayar.models.load import merge_adapters

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", trust_remote_code=cfg.model.trust_remote_code)
    model = merge_adapters(model, adapters, log=lambda *_: None)
    with atomic_directory(out, fsync=True) as tmp:
        model.save_pretrained(str(tmp))


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
    chained = ""
    if meta.get("merged_adapters"):
        how = meta.get("adapter", {})
        base = how.get("applies_to", base)
        holds = "holds them and this run's training in one adapter" if "stacked" in how else "holds this run's adapter"
        chained = (
            f"This run started from earlier run(s) ({', '.join(meta['merged_adapters'])}); `adapter/` {holds} "
            f"that applies to `{base}` (this stage alone is in `stage_adapter/`, on top of the earlier ones "
            "merged in).\n\n"
        )
    return chained + (
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
