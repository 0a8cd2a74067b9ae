"""DeepSpeed ZeRO (`distributed.strategy: deepspeed`). ayar writes the DeepSpeed config from the run's own settings.
Every value is concrete (no "auto"), so the file is also what `deepspeed` itself reads: DeepSpeed's own config class
accepts it (tested).

The Trainer-based stages (DPO family, reward, GRPO, classification) hand it to transformers' TrainingArguments
(`deepspeed=`), whose accelerate DeepSpeed plugin starts the engine. ayar's own loop (stage sft) starts the engine
itself (`Zero`, deepspeed.initialize) on the model with its loss in the forward (loss.py `WithLoss`, as FSDP's root
unit), with the optimizer and schedule the loop made: the engine exchanges the gradients in the last micro-batch's
backward, clips and steps; mixed precision stays ayar's own (fp32 trained weights, as in one process), so one process
and N under ZeRO train the same model (tested).

Stage 2 splits gradients and optimizer states across the processes, stage 3 the weights too; `offload` keeps
optimizer states (and, stage 3, weights) in CPU RAM, where DeepSpeed's CPU Adam steps them (for GPUs; on a CPU they are
there already and the run goes the same way: tested).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from ayar.training.checkpoint import ZERO
from ayar.training.distributed import Replicas, World
from ayar.training.loss import WithLoss


def deepspeed_config(t, d, plan) -> dict:
    """The DeepSpeed config of a run (`t`: its training section, `d`: its distributed one): its batch,
    accumulation, clipping, precision and the ZeRO stage asked for."""
    zero: dict = {
        "stage": d.zero_stage,
        "overlap_comm": plan.device.startswith("cuda"),
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
    }
    if d.zero_stage == 3:
        # the whole model gathered on rank 0 when saving: the adapter / model is written as one file, not split
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    extra: dict = {}
    if d.offload:
        pinned = plan.device.startswith("cuda")  # page-locked memory speeds copies to GPUs; nothing to copy on a CPU
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pinned}
        if d.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pinned}
        # DeepSpeed steps offloaded states with its CPU Adam only; a Trainer's own torch optimizer is refused there
        # (its ZeRORuntimeException), so the Trainer stages name it here: transformers then hands the optimizer to
        # DeepSpeed and keeps its own schedule. The values are TrainingArguments' (transformers checks they match).
        extra["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": t.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": t.weight_decay},
        }
    return {
        **extra,
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * plan.world_size,
        "gradient_clipping": t.max_grad_norm if t.max_grad_norm > 0 else 0.0,
        "bf16": {"enabled": plan.placement.dtype == torch.bfloat16},
        "fp16": {"enabled": plan.placement.dtype == torch.float16},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # progress and metrics are ayar's (metrics.jsonl), not DeepSpeed's log lines
        "wall_clock_breakdown": False,
    }


@contextmanager
def split_while_loading(plan, tcfg):
    """ZeRO-3 with rank-0 loading (`plan.splits_while_loading`): a model loaded inside is built split (transformers
    builds it under DeepSpeed's zero.Init while a DeepSpeed config is registered with it) and rank 0 reads the files
    (transformers holds their weights in rank 0's CPU RAM meanwhile), handing each process its part a layer at a
    time: no GPU, and no process but rank 0, holds the whole model (measured: benchmarks/README.md). peft, adding an
    adapter inside, gathers what it reads of the split weights (DoRA's norms). Weights split in the loaded dtype
    (the config's bf16/fp16 switch); the engine ayar's own loop starts later takes the split weights as they are.
    Elsewhere nothing happens."""
    if not plan.splits_while_loading:
        yield
        return
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    deepspeed.init_distributed(verbose=False)  # DeepSpeed's config counts the processes in its own group
    registered = HfDeepSpeedConfig(deepspeed_config(tcfg, plan.distributed, plan))  # noqa: F841 (held weakly)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()  # later loads (a model's shape for the memory plan, on the meta device) whole


def trained_state(model) -> dict:
    """ZeRO-3: the trained weights gathered whole from their parts one at a time (collective: every rank calls it),
    kept by rank 0 alone ({} elsewhere: a full fine-tune is whole in one process only), named as in the model's
    state_dict, for `save_pretrained(state_dict=...)`; the model's own weights stay split."""
    import deepspeed
    import torch.distributed as dist

    main, out = dist.get_rank() == 0, {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if main:
                    out[name] = p.detach().cpu().clone()
    return out


def loop_config(tcfg, plan) -> dict:
    """The config of the engine ayar's own loop starts: the loop decides where an optimizer step's micro-batches end
    (they vary: training.rows_per_pass splits them), so the engine takes one micro-batch per step and is told the
    boundary; ayar's own mixed precision (fp32 trained weights) rather than the engine's casting of the model."""
    out = deepspeed_config(tcfg, plan.distributed, plan)
    out.pop("optimizer", None)  # the loop's own (with offload, DeepSpeed's CPU Adam: training/optim.py)
    out.update(
        gradient_accumulation_steps=1,
        train_batch_size=tcfg.batch_size * plan.world_size,
        bf16={"enabled": False},
        fp16={"enabled": False},
        zero_allow_untested_optimizer=True,  # ayar's optimizers (training/optim.py: torch AdamW, LoRA+, 8-bit)
    )
    return out


class Zero(Replicas):
    """ayar's own loop on a DeepSpeed engine (ZeRO stage 2 or 3). Checkpoints are DeepSpeed's own (every process its
    part of the optimizer states, and at stage 3 of the weights); the best weights early stopping keeps are copied
    whole, as with one process (stage 3: gathered a weight at a time onto rank 0, so no process holds a second whole
    copy of a fully fine-tuned model beside its part)."""

    split = ZERO  # read back into another number of processes through DeepSpeed's universal checkpoint (`read_split`)
    lockstep = True

    def __init__(self, model, tcfg, plan, world: World):
        super().__init__(model, world)  # rank 0's starting values everywhere, as with one process's seed
        self.tcfg, self.plan, self.stage, self.engine = tcfg, plan, plan.distributed.zero_stage, None

    def prepare(self, optimizer) -> None:
        import deepspeed

        root = WithLoss(self.model)
        self.engine, *_ = deepspeed.initialize(
            model=root, optimizer=optimizer, config=loop_config(self.tcfg, self.plan)
        )
        if self.stage == 3:  # the loss reads the head's weight outside the head's forward: made whole with the root's
            deepspeed.zero.register_external_parameter(root, self.model.get_output_embeddings().weight)

    def forward(self, batch: dict, loss_fn=None, fused: bool = False, autocast=None, last: bool = True):
        self.engine.set_gradient_accumulation_boundary(last)
        return self.engine(batch, loss_fn, fused, autocast)

    def backward(self, loss) -> None:
        # the engine averages gradients over the processes; each process's loss is its share of the global mean
        # already (training/loop.py), so the sum is what one process would get from the whole batch
        self.engine.backward(loss * self.world.size)

    def step(self, optimizer, max_grad_norm: float) -> float:
        self.engine.step()  # clips (the config's gradient_clipping), steps the optimizer, zeroes the gradients
        return float(self.engine.get_global_grad_norm())

    def evaluate(self, batch: dict, autocast=None):
        return self.engine(batch, autocast=autocast)

    def write_split(self, folder: Path, optimizer=None) -> None:
        self.engine.save_checkpoint(str(folder / ZERO), tag="state", save_latest=False, exclude_frozen_parameters=True)

    def read_split(self, folder: Path, optimizer=None) -> None:
        """DeepSpeed's checkpoint read back, each process its parts. Written by another number of processes, rank 0
        first converts it into DeepSpeed's universal checkpoint (`ds_to_universal`: every weight and its optimizer
        states whole, one folder each) beside it, which every process reads its new parts from; the copy is removed
        once read (the checkpoint itself is left as it was)."""
        import torch.distributed as dist

        from ayar.training.checkpoint import world_size_of

        tag, universal = "state", world_size_of(folder) != self.world.size
        if universal:
            tag = "universal"
            if self.world.main:
                _to_universal(folder / ZERO / "state", folder / ZERO / tag)
            dist.barrier(group=self.world.patient)  # rank 0 converting: minutes on a large model
        # DeepSpeed reads the layout from its config's `checkpoint.load_universal`, fixed when the engine started;
        # a run learns only now that its checkpoint needs it
        self.engine._config.load_universal_checkpoint = universal
        try:
            self.engine.load_checkpoint(
                str(folder / ZERO), tag=tag, load_module_strict=False, load_lr_scheduler_states=False
            )
        finally:
            self.engine._config.load_universal_checkpoint = False
            if universal:
                dist.barrier()
                if self.world.main:
                    import shutil

                    shutil.rmtree(folder / ZERO / tag, ignore_errors=True)
                    (folder / ZERO / "latest_universal").unlink(missing_ok=True)  # the conversion's pointer to it

    def trained_copy(self) -> dict:
        """The trained weights named as a saved adapter (or model) names them; at stage 3 gathered one at a time
        (collective) and kept by rank 0 alone ({} elsewhere: `load_trained` reads rank 0's)."""
        from ayar.training.checkpoint import trained_state

        if self.stage != 3:
            return trained_state(self.model)
        import deepspeed

        out = {}
        for key, p in _as_saved(self.model).items():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.world.main:
                    out[key] = p.detach().contiguous().cpu().clone()
        return out

    def load_trained(self, state: dict) -> None:
        """`trained_copy`'s weights put back (collective); at stage 3 rank 0's, split again one weight at a time."""
        from ayar.training.checkpoint import load_trained_state

        if self.stage != 3:
            return load_trained_state(self.model, state)
        import deepspeed

        for key, p in _as_saved(self.model).items():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if self.world.main:
                    p.data.copy_(state[key])

    def whole_state(self) -> dict | None:
        return trained_state(self.model) if self.stage == 3 else None


def _to_universal(source: Path, out: Path) -> None:
    """DeepSpeed's own conversion (deepspeed/checkpoint/ds_to_universal.py, as its command line runs it) of a ZeRO
    checkpoint into its universal layout; its progress lines kept off the run's output. `inject_missing_state`:
    ayar's engine is not Megatron's, whose checkpoints carry the conversion's version stamp."""
    import argparse
    import contextlib
    import io
    import shutil

    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out, ignore_errors=True)  # a conversion a crash left half done
    args = argparse.Namespace(
        input_folder=str(source), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )  # fmt: skip
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(args)
    except Exception as e:  # a layout DeepSpeed's conversion does not know: the way back is as many processes
        from ayar.errors import AyarError

        shutil.rmtree(out, ignore_errors=True)
        raise AyarError(
            f"{source.parent.parent} was written by another number of processes, and DeepSpeed could not convert "
            f"its checkpoint to read it into this many ({type(e).__name__}: {e}); resume it with --nproc as in "
            "its run.json (plan.world_size)"
        ) from None


def _as_saved(model) -> dict:
    """Each trained weight under the name a saved adapter gives it (peft's, as checkpoint.trained_state writes them)
    or, fully fine-tuned, the model's own: peft renames the parameters it is handed and passes them through."""
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model, state_dict=trained)
    return trained
