"""The run plan: how a training run executes, decided once at setup and handed down.

`decide(cfg)` makes the decisions that come before the model loads (device, weights dtype, autocast,
4-bit loading, processes); `RunPlan.with_passes(...)` adds those that need the loaded model and the
tokenized data (padding-free passes, the fused decoder, rows per pass, gradient checkpointing, memory
release, the memory plan). The plan is printed, recorded in run.json (`plan`), and read by the loop,
the loss and the memory planner; nothing below re-decides it.

`world_size` and `rank` come from the launcher's environment (WORLD_SIZE, RANK: torchrun, accelerate):
1 and 0 for a plain process.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from ayar.errors import AyarError
from ayar.kernels import liger
from ayar.models.device import Placement, choose_placement
from ayar.quiet import name_deepspeed_accelerator
from ayar.training.memory import QUANTIZED, Layout, MemoryPlan, Shape, Sharding
from ayar.training.trainer_plan import plan_trainer_for


@dataclass(frozen=True)
class RunPlan:
    placement: Placement  # where and in which dtype the weights are loaded
    autocast: torch.dtype | None = None  # full fine-tuning in half precision: fp32 master weights, this compute dtype
    quantized: bool = False  # QLoRA/QDoRA: the base loaded in 4-bit NF4
    world_size: int = 1
    rank: int = 0
    strategy: str = "single"  # one process; several: `ddp` or `fsdp` (distributed.strategy, training/sharding.py)
    distributed: object | None = None  # the config's `distributed` section (FSDP's shard and offload options)
    liger: bool = False  # Liger's Triton kernels patched in (CUDA with liger-kernel installed; kernels/liger.py)
    layout: Layout | None = None  # the passes, once the model and data are known (SFT's own loop)
    not_fused_because: str | None = None
    return_memory: bool = False  # hand freed memory back at once (training/allocator.py)
    loading: str = "rank0"  # FSDP, ZeRO-3: who reads the weights: rank0 | every_rank | parts (`weights_loading`)
    parts_from: str | None = None  # `parts`: the model folder each rank reads its own parts of the weights from
    saving: str = "whole"  # under FSDP, how a full fine-tune is saved: whole (gathered on rank 0) | parts
    memory: MemoryPlan | None = None

    @property
    def device(self) -> str:
        return self.placement.device

    @property
    def rank0_loading(self) -> bool:
        return self.strategy == "fsdp" and self.loading == "rank0"

    @property
    def reads_weights(self) -> bool:
        """Whether this process loads the model's weights: under FSDP with rank-0 loading only rank 0 does, the
        others build the model empty and receive their parts as it is split (training/sharding.py), never holding
        the whole model; with `parts` none does: each builds it empty and reads its own parts from the files."""
        if self.strategy != "fsdp" or self.loading == "every_rank":
            return True
        return self.loading == "rank0" and self.rank == 0

    @property
    def splits_while_loading(self) -> bool:
        """DeepSpeed ZeRO-3 with rank-0 loading: the model is built split and rank 0 reads the weights a layer at a
        time, each process keeping its part (training/zero.py `split_while_loading`)."""
        return self.strategy == "deepspeed" and self.distributed.zero_stage == 3 and self.loading == "rank0"

    @property
    def load_placement(self) -> Placement:
        """Where the weights are loaded: under FSDP into CPU RAM (splitting the model moves each rank's part to its
        device: a GPU never holds the whole model); elsewhere where they train."""
        return dataclasses.replace(self.placement, device="cpu") if self.strategy == "fsdp" else self.placement

    @property
    def cpu_adam(self) -> bool:
        """DeepSpeed with offload: the optimizer states live in CPU RAM and DeepSpeed's own CPU Adam steps them
        (DeepSpeed refuses a torch optimizer there); ayar's own loop builds it, the Trainer stages name it in the
        DeepSpeed config (training/zero.py)."""
        return self.strategy == "deepspeed" and bool(self.distributed.offload)

    @property
    def loss_scaling(self) -> bool:
        """Whether the passes compute in fp16 (autocast over fp32 weights, or an adapter over fp16 weights): fp16's
        narrow range flushes small gradients to zero, so the loss is scaled up before backward and the gradients back
        down before the step, and a step whose gradients overflowed is skipped at a lower scale (torch's GradScaler,
        what the Trainer stages get from accelerate)."""
        return torch.float16 in (self.autocast, self.placement.dtype)

    @property
    def memory_strategy(self) -> str:
        """What the memory plan splits across the processes (training/memory.py `Sharding`)."""
        return memory_strategy(self.strategy, self.distributed)

    @property
    def splits_weights(self) -> bool:
        """Whether each process holds a part of every weight (FSDP, DeepSpeed ZeRO-3)."""
        return Sharding(self.world_size, self.memory_strategy).splits_weights

    @property
    def is_main(self) -> bool:
        """The process that writes the run directory, logs and trackers."""
        return self.rank == 0

    def with_passes(self, cfg, model, examples, say=print) -> RunPlan:
        """The pass layout of this model on these examples, gradient checkpointing (as configured, or on
        when the run would not fit without it), memory release, and the memory plan; stops here, before
        the first step, when the predicted peak cannot fit (`training.memory_check`)."""
        tcfg = cfg.training
        packed = padding_free(model, tcfg, self.device)
        why_not = not_fused_because(model, tcfg, self.device, packed, self.strategy)
        checkpointing, release, memory = bool(tcfg.gradient_checkpointing), bool(tcfg.return_memory), None
        if tcfg.memory_check != "off":
            shape = shape_of(model.config, cfg)
            memory, checkpointing, release = _check_memory(
                cfg,
                shape,
                examples,
                self.placement,
                packed,
                why_not,
                say,
                self._sharding() if self.world_size > 1 else None,
                _name(self.autocast),
            )
        layout = Layout(rows_per_pass(tcfg, self.device, why_not is None), packed, why_not is None, checkpointing)
        return dataclasses.replace(self, layout=layout, not_fused_because=why_not, return_memory=release, memory=memory)

    def with_trainer_memory(self, cfg, model, tok, records, say=print) -> RunPlan:
        """`with_passes` for a Trainer stage (training/trl_stage.py): its passes are the Trainer's (padded rows through
        transformers + peft modules, the whole micro-batch at once); gradient checkpointing, memory release and the
        memory plan are decided as for ayar's own loop, and a run that cannot fit stops here
        (`training.memory_check`)."""
        tcfg = cfg.training
        checkpointing, release, memory = bool(tcfg.gradient_checkpointing), bool(tcfg.return_memory), None
        if tcfg.memory_check != "off":
            shape = shape_of(model.config, cfg)
            sharding = self._sharding() if self.world_size > 1 else None
            available = _available_per_process(self.device, sharding)
            found = plan_trainer_for(shape, cfg, tok, records, self.placement, available, sharding)
            memory, checkpointing, release = _judge_memory(cfg, *found, say, sharding)
        layout = Layout(0, False, False, checkpointing)
        why = "a Trainer stage: transformers + peft modules on padded rows"
        return dataclasses.replace(self, layout=layout, not_fused_because=why, return_memory=release, memory=memory)

    def _sharding(self) -> Sharding:
        # offload moves parts from the GPU's memory into CPU RAM; on a CPU they stay in the memory checked
        offload = self.memory_strategy != "ddp" and bool(self.distributed.offload) and self.device != "cpu"
        return Sharding(self.world_size, self.memory_strategy, offload)

    def summary(self) -> dict:
        """What run.json records of the plan."""
        out = {
            "device": self.device,
            "dtype": self.placement.dtype_name,
            "dtype_reason": self.placement.reason,
            "autocast": _name(self.autocast),
            "quantized": self.quantized,
            "world_size": self.world_size,
            "strategy": self.strategy,
            "liger": self.liger,
        }
        if self.strategy == "fsdp":
            out.update(loading=self.loading, saving=self.saving)
        if self.strategy == "deepspeed":
            out["zero_stage"] = self.distributed.zero_stage
            if self.distributed.zero_stage == 3:
                out["loading"] = self.loading
        if self.strategy in ("fsdp", "deepspeed"):
            out["offload"] = bool(self.distributed.offload)
        if self.loss_scaling:
            out["loss_scaling"] = True
        if self.layout is not None:
            out["return_memory"] = self.return_memory
        if self.memory is not None:
            out.update(predicted_peak_bytes=self.memory.total, available_bytes=self.memory.available)
        return out

    def passes(self) -> dict | None:
        """The pass layout as run.json records it (`passes`)."""
        lay = self.layout
        if lay is None:
            return None
        return {
            "rows_per_pass": lay.per_pass,
            "padding_free": lay.packed,
            "fused": lay.fused,
            "not_fused_because": self.not_fused_because,
            "gradient_checkpointing": lay.checkpointing,
        }

    def passes_line(self) -> str:
        lay = self.layout
        return (
            f"passes {lay.per_pass or 'all'} rows each, {'padding-free' if lay.packed else 'padded'}, "
            + ("fused decoder" if lay.fused else f"transformers + peft modules ({self.not_fused_because})")
            + (", gradient checkpointing" if lay.checkpointing else "")
        )


def decide(cfg) -> RunPlan:
    """The decisions made before the model loads. Full fine-tuning keeps fp32 master weights and computes
    in the half dtype the placement picks (autocast); adapters train in fp32 over a half-precision base
    anyway; QLoRA loads the base in 4-bit and computes in the placement's dtype."""
    placement, autocast = master_weights(cfg, choose_placement(cfg.model.device, cfg.model.dtype))
    name_deepspeed_accelerator(placement.device)
    world_size, rank = launcher_world()
    check_gpus(placement.device, world_size)
    strategy = cfg.distributed.strategy if world_size > 1 else "single"
    check_strategy(cfg, strategy, placement.device)
    quantized = cfg.method in QUANTIZED
    use_liger = liger.applies(placement.device)
    plan = RunPlan(placement, autocast, quantized, world_size, rank, strategy, cfg.distributed, use_liger)
    if strategy == "deepspeed" and own_loop(cfg) and plan.loss_scaling:
        raise AyarError(
            "distributed.strategy deepspeed with fp16 compute: ayar's own loop does not scale the loss under "
            "DeepSpeed yet (fp16 gradients would underflow); use model.dtype: bfloat16 (GPUs since Ampere), or "
            "distributed.strategy fsdp or ddp (both scale it)"
        )
    return dataclasses.replace(plan, **weights_loading(cfg, plan))


def weights_loading(cfg, plan: RunPlan) -> dict:
    """Under FSDP, which processes read the model's weights (`distributed.loading`): `rank0` alone (it sends the
    others their parts), `every_rank`, or `parts`: each its own parts, from the files (ayar's own loop). `auto`:
    for our own loop `parts` where the model folder's files hold every weight by name (sharding.shard), else
    `rank0`. A full fine-tune loaded by parts is saved by parts too (`saving`, sharding.save_by_parts): the files
    hold every weight under the model's own names, so the model's names are what a saved folder must hold (where
    transformers renames weights at load, save_pretrained must undo it: rank 0 gathers and saves it whole). DoRA's
    magnitudes are computed by each process from its rows (models/adapters.py `init_dora_magnitudes`).
    For the Trainer stages (accelerate's `cpu_ram_efficient_loading`): `rank0` where loading converts the
    weights' dtype, as each process would hold a converted copy of the whole model; `every_rank` where the file is
    in the loaded dtype: then the processes map the same file (pages a machine's processes share) and split it in
    place, while accelerate's rank-0 path holds rank 0's whole state dict beside its part (measured:
    benchmarks/README.md). Under DeepSpeed ZeRO-3, `rank0` builds the model split as it loads
    (`splits_while_loading`), `every_rank` loads it whole in every process for the engine to split; `auto`: `rank0`
    on GPUs (each GPU would otherwise hold the whole model first), `every_rank` on a CPU, where the processes share
    the mapped file's pages and split-built runs peaked no lower (higher where freed memory was not returned from
    the start; measured: benchmarks/README.md). A 4-bit base split by either: `_quantized_loading`."""
    from ayar.models.load import stored_dtype

    asked = cfg.distributed.loading
    if plan.strategy == "deepspeed" and asked == "parts":
        raise AyarError(
            "distributed.loading parts is FSDP's; under DeepSpeed ZeRO-3 the model is split as it loads, rank 0 "
            "reading the files (distributed.loading: rank0; auto picks it on GPUs)"
        )
    zero3 = plan.strategy == "deepspeed" and cfg.distributed.zero_stage == 3
    if plan.quantized and plan.splits_weights:
        return {"loading": _quantized_loading(cfg, plan.strategy == "fsdp", asked)}
    if zero3 and asked == "auto":
        return {"loading": "rank0" if plan.device.startswith("cuda") else "every_rank"}
    if plan.strategy != "fsdp":
        return {"loading": "rank0" if asked == "auto" else asked}
    if own_loop(cfg) and asked in ("auto", "parts"):
        folder, why_not = _parts_folder(cfg, plan)
        if folder:
            return {"loading": "parts", "parts_from": folder, "saving": "parts" if cfg.method == "full" else "whole"}
        if asked == "parts":
            raise AyarError(f"distributed.loading parts: {why_not}; use distributed.loading: rank0")
        return {"loading": "rank0"}
    if asked == "parts":
        raise AyarError(
            f"distributed.loading parts is for ayar's own loop (stage sft); stage {cfg.stage} / task {cfg.task} "
            "runs on a transformers Trainer, which loads through accelerate: use rank0 or every_rank"
        )
    if asked != "auto":
        return {"loading": asked}
    return {"loading": "rank0" if stored_dtype(cfg.model.name) != plan.load_placement.dtype else "every_rank"}


def _quantized_loading(cfg, fsdp: bool, asked: str) -> str:
    """`weights_loading` for a 4-bit base (QLoRA/QDoRA) whose weights are split. Under FSDP in ayar's own loop
    `rank0` (auto's choice): rank 0 loads and quantizes the base, the others build it empty and receive the packed
    weights' parts and the quant states (training/sharding.py `four_bit_from_rank0`), so only rank 0 ever holds
    the whole 4-bit base. Elsewhere `every_rank`: each process quantizes the base as it loads it, then keeps its
    part (accelerate 1.15 turns its rank-0 loading off for a model holding 4-bit weights; DeepSpeed's split-building
    sends parameters only, not quant states)."""
    rank0 = fsdp and own_loop(cfg)
    if asked in ("auto", "rank0") and rank0:
        return "rank0"
    if asked in ("auto", "every_rank"):
        return "every_rank"
    engine = "FSDP" if fsdp else "DeepSpeed ZeRO-3"
    if rank0:
        way = "rank 0 quantizes the base to 4 bits as it loads it and sends the others their parts; use "
        way += "distributed.loading: rank0 (auto picks it)"
    else:
        way = "each process quantizes the base to 4 bits as it loads it, then keeps its part; use "
        way += "distributed.loading: every_rank (auto picks it)"
    raise AyarError(f"distributed.loading {asked} with method {cfg.method} under {engine}, stage {cfg.stage}: {way}")


def _parts_folder(cfg, plan: RunPlan) -> tuple[str | None, str]:
    """The model folder each process can read its own parts of the weights from, or None and why not: a local
    folder whose safetensors files hold every weight under the model's own name (an empty model built from its
    config, checked against the files' headers: no weights read), for a method whose start each process can
    compute from its parts (DoRA's magnitudes from output rows: its adapter made on the empty model to check)."""
    from ayar.models.adapters import apply_method, dora_by_rows
    from ayar.models.load import empty_model, model_folder, starting_point
    from ayar.training.sharding import not_in_files

    if cfg.method not in ("lora", "dora", "full"):
        return None, f"method {cfg.method} starts from the whole weights"
    base, adapters = starting_point(cfg.model.name)
    folder = model_folder(base)
    if adapters or folder is None:
        return None, f"{cfg.model.name} is not a model folder on this machine"
    m = cfg.model
    model = empty_model(str(folder), plan.load_placement, m.attn_implementation, m.trust_remote_code)
    missing = not_in_files(model, folder)
    if missing:
        return None, f"the safetensors files in {folder} do not hold {missing[0]} as the model names it"
    if cfg.method == "dora":
        why_not = dora_by_rows(apply_method(model, "dora", cfg.lora))
        if why_not:
            return None, why_not
    return str(folder), ""


def own_loop(cfg) -> bool:
    """Whether the run trains on ayar's own loop (causal-LM SFT); every other stage and task on a Trainer."""
    return cfg.stage == "sft" and cfg.task == "causal_lm"


_SPLIT_BY = {"fsdp": "distributed.strategy fsdp", "zero3": "deepspeed ZeRO-3"}


def check_strategy(cfg, strategy: str, device: str) -> None:
    """Refuse, before anything loads, what a distributed strategy cannot run (each with the way out)."""
    from ayar.models.adapters import CONVERTED_INITS

    d = cfg.distributed
    if strategy == "deepspeed" and d.offload and cfg.training.optimizer == "adamw_8bit":
        raise AyarError(
            "training.optimizer adamw_8bit with distributed.offload under DeepSpeed: the offloaded optimizer states "
            "are stepped in CPU RAM by DeepSpeed's CPU Adam, not by bitsandbytes on the GPU; use training.optimizer: "
            "adamw (or drop distributed.offload)"
        )
    if strategy == "fsdp" and not own_loop(cfg) and d.shard == "hybrid":
        raise AyarError(
            f"distributed.shard hybrid is for ayar's own loop (stage sft); stage {cfg.stage} / task {cfg.task} runs "
            "on a transformers Trainer, which splits across every process: use distributed.shard: full"
        )
    if strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise AyarError(
                "distributed.strategy deepspeed needs DeepSpeed, which is not installed: pip install -e "
                "'.[deepspeed]' (or use distributed.strategy: ddp)"
            ) from None
    # what splits the weights, named as the messages below name it
    planned = memory_strategy(strategy, d)
    split = _SPLIT_BY[planned] if Sharding(strategy=planned).splits_weights else None
    if split and cfg.method != "full":
        from ayar.models.load import starting_point

        if starting_point(cfg.model.name)[1]:
            raise AyarError(
                f"model.name {cfg.model.name} is a run whose adapter this one would continue from; under {split} the "
                "weights are split and the adapters are not stacked at the end: export that run merged (ayar export "
                "RUN --to merged) and point model.name at the merged model, or use strategy ddp"
            )
    if split is None:
        return
    if strategy == "deepspeed" and not own_loop(cfg):  # the Trainer's ZeRO-3: transformers' checks
        return
    if cfg.lora.init in CONVERTED_INITS and cfg.method != "full":
        raise AyarError(
            f"lora.init {cfg.lora.init} under {split}: converting the adapter for the original base "
            "needs the whole model in one process; use lora.init: default, or strategy ddp"
        )


def check_gpus(device: str, world_size: int) -> None:
    """Each process on CUDA takes the GPU its LOCAL_RANK numbers (or the one GPU it shows, where the launcher gives
    each process its own, as Slurm's `--gpus-per-task 1` does: training/distributed.py `start`): more processes on a
    machine than the several GPUs it shows would stop in torch ("invalid device ordinal") after the launch, so it is
    said before anything loads."""
    if not device.startswith("cuda") or world_size <= 1:
        return
    here, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), torch.cuda.device_count()
    if 1 < gpus < here:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise AyarError(
            f"{here} training processes on this machine, but it shows {gpus} GPU(s)"
            + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
            + f": start one per GPU (ayar train --nproc {gpus} or --nproc auto; torchrun --nproc_per_node {gpus}), "
            "or make more GPUs visible"
        )


def launcher_world() -> tuple[int, int]:
    """(world size, rank) as set by torchrun / accelerate launch; (1, 0) in a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


# --- the pass layout: one set of rules, for a loaded model (training) and for a config alone (`ayar plan`) ---


def rows_per_pass(tcfg, device: str, fused: bool = False) -> int:
    """`training.rows_per_pass`, with auto (0) resolved: on CPU, passes of a few similar-length rows were
    fastest (benchmarks/README.md): 4 with the fused decoder (its rows share their common opening, and
    it keeps less per token), else 2; on GPUs the whole micro-batch, where bigger matmuls win."""
    if tcfg.rows_per_pass > 0:
        return tcfg.rows_per_pass
    if device != "cpu":
        return 0
    return 4 if fused else 2


def padding_free(model, tcfg, device: str) -> bool:
    """Passes as packed rows: when asked (`training.packing`), and always where attention can run per
    example (kernels/varlen.py: on CPU, for plain-attention models), since it is then the same computation
    as padding without the padding."""
    from ayar.kernels import base_model, varlen

    return tcfg.packing or varlen.supported(base_model(model).config, device)


def not_fused_because(model, tcfg, device: str, packed: bool, strategy: str = "ddp") -> str | None:
    """Why this run's passes do not take the fused decoder (None: they do, and its layer plan is built: the
    plan restacks weights into new tensors and holds them, so it is built only for a run that uses it)."""
    from ayar.kernels import fused_decoder

    if not tcfg.fused:
        return "training.fused is false"
    if not packed:
        return "padded rows"
    if strategy == "fsdp":
        return "FSDP splits the weights, the fused decoder reads them whole"
    if strategy == "deepspeed":
        return "DeepSpeed's engine runs the model's own modules (its hooks exchange gradients and gather weights)"
    return None if fused_decoder.usable(model, device) else fused_decoder.reason(model, device)


def predicted_layout(
    shape: Shape, cfg, device: str, checkpointing: bool = False, sharding: Sharding | None = None
) -> Layout:
    """The layout `with_passes` will pick, predicted from the config and the model's shape alone (no
    weights): padding-free where attention can run per example or packing is asked for; the fused
    decoder where it applies (`training.fused`, LoRA on a supported family, nothing else trainable, and not under
    FSDP or DeepSpeed: `not_fused_because`)."""
    packed = cfg.training.packing or (device == "cpu" and shape.plain_attention)
    fused = (
        packed
        and cfg.training.fused
        and device == "cpu"
        and cfg.method == "lora"
        and shape.fused_family
        and not cfg.lora.modules_to_save
        and (sharding is None or sharding.strategy == "ddp")
    )
    return Layout(rows_per_pass(cfg.training, device, fused), packed, fused, checkpointing)


# --- memory -----------------------------------------------------------------------------------------------


def plan_memory_for(
    shape: Shape,
    cfg,
    examples,
    placement: Placement,
    layout: Layout | None = None,
    available: int | None = None,
    sharding: Sharding | None = None,
    compute_dtype: str | None = None,
):
    """(memory plan, settings that would fit, layout): the plan for `layout` (default: the predicted one)
    with gradient checkpointing as configured, or, left to auto, on only when the run cannot fit without
    it. `available` and `sharding`: another machine's memory per device and processes (`Target`);
    `compute_dtype`: the run's autocast (a full fine-tune's compute over fp32 master weights)."""
    from ayar.training.memory import plan_layout, suggestions

    dtype, device = placement.dtype_name, placement.device
    choice = cfg.training.gradient_checkpointing
    layout = dataclasses.replace(
        layout or predicted_layout(shape, cfg, device, sharding=sharding), checkpointing=bool(choice)
    )
    across = {"sharding": sharding, "compute_dtype": compute_dtype}
    plan = plan_layout(shape, cfg, examples, dtype, device, layout, available, **across)
    if choice is None and not plan.fits:
        with_checkpointing = dataclasses.replace(layout, checkpointing=True)
        ckpt = (shape, cfg, examples, dtype, device, with_checkpointing, plan.available)
        plan_ckpt = plan_layout(*ckpt, **across)
        if plan_ckpt.fits:
            return plan_ckpt, [], with_checkpointing
    fixes = [] if plan.fits else suggestions(shape, cfg, examples, dtype, device, plan.available, layout, **across)
    return plan, fixes, layout


def memory_strategy(strategy: str, distributed) -> str:
    """The memory plan's name (`Sharding.strategy`) for a run's strategy (`distributed.strategy`, or "single" for one
    process, planned as data parallel's one rank)."""
    if strategy == "deepspeed":
        return f"zero{distributed.zero_stage}"
    return "fsdp" if strategy == "fsdp" else "ddp"


def configured_sharding(cfg, nproc: int) -> Sharding:
    """How `nproc` processes share the model as the config's `distributed` section says (strategy, ZeRO stage,
    offload), named as the memory plan names it; one process runs as one, whatever the section says (`decide`)."""
    strategy = memory_strategy(cfg.distributed.strategy, cfg.distributed) if nproc > 1 else "ddp"
    return Sharding(nproc, strategy, strategy != "ddp" and bool(cfg.distributed.offload))


@dataclass(frozen=True)
class Target:
    """A machine to plan for that is not this one (`ayar plan --device cuda --gpu-memory 24GB --nproc 8`)."""

    device: str = "cuda"
    memory: int | None = None  # bytes per device; None: this machine's free memory
    sharding: Sharding = Sharding()


def master_weights(cfg, placement: Placement) -> tuple[Placement, torch.dtype | None]:
    """(placement, autocast dtype): full fine-tuning keeps fp32 master weights and computes in the half dtype the
    placement picked, under autocast; anything else loads and computes in the placement's dtype."""
    if cfg.method == "full" and placement.dtype != torch.float32:
        return dataclasses.replace(placement, dtype=torch.float32), placement.dtype
    return placement, None


def target_placement(cfg, device: str) -> tuple[Placement, torch.dtype | None]:
    """(placement, autocast dtype) a run would get on the target: the configured dtype, else bf16 on a GPU (assumed
    one that has it: Ampere or newer) and this machine's rule on a CPU; `master_weights` as `decide`."""
    if cfg.model.dtype != "auto" or device != "cuda":
        placement = dataclasses.replace(choose_placement("cpu", cfg.model.dtype), device=device)
    else:
        placement = Placement(device, torch.bfloat16, "assumed: a GPU with bf16 (set model.dtype=float16 for older)")
    return master_weights(cfg, placement)


def plan_for_config(cfg, log=print, target: Target | None = None):
    """Plan a TrainConfig without loading the weights: model config, tokenizer and (cached) tokenized data. A model
    folder with a config.json only (no weights, no tokenizer) plans rows of `data.max_length` tokens each, the worst
    case, and says so through `log`. `target`: plan for another machine (device, memory, processes, sharding)."""
    from transformers import AutoConfig

    from ayar.data.dataset import prepare_data
    from ayar.models.load import load_tokenizer, resolve_model_path

    path = resolve_model_path(cfg.model.name, log=log)
    shape = shape_of(AutoConfig.from_pretrained(path), cfg)
    run = decide(cfg)
    placement, autocast, memory, sharding = run.placement, run.autocast, None, None
    if target is not None:
        (placement, autocast), memory, sharding = target_placement(cfg, target.device), target.memory, target.sharding
        if memory is None and target.device == "cpu":  # this machine's RAM, shared by its processes (as training plans)
            from ayar.training.memory import cpu_memory_per_process

            memory = cpu_memory_per_process(target.sharding.nproc)
    sharding_here = sharding or (run._sharding() if run.world_size > 1 else None)
    _say_quantized_loading(cfg, shape, sharding_here, placement.dtype_name, log)
    if not own_loop(cfg):
        return _plan_trainer_for_config(cfg, path, shape, placement, memory, sharding, log)
    if _has_tokenizer(path):
        tok = load_tokenizer(path)
        examples = prepare_data(dataclasses.replace(cfg.data, lint="off"), tok, seed=cfg.training.seed).train
    else:
        n = cfg.data.max_length
        log(f"{path} has no tokenizer: planning {cfg.training.batch_size} rows of {n} tokens each (the worst case)")
        examples = [_Row(n) for _ in range(cfg.training.batch_size)]
    return plan_memory_for(shape, cfg, examples, placement, None, memory, sharding, _name(autocast))


def _say_quantized_loading(cfg, shape, sharding, weight_dtype: str, log) -> None:
    """Where QLoRA's weights are split (FSDP, ZeRO-3), rank 0 or each process first loads the whole 4-bit base
    (`weights_loading`), which setup holds before training starts and the plan (training's peak) does not count."""
    from ayar.training.memory import quantized_weight_bytes

    if cfg.method not in QUANTIZED or sharding is None or not sharding.splits_weights:
        return
    fsdp = sharding.strategy == "fsdp"
    size = f"({quantized_weight_bytes(shape, weight_dtype) / 2**30:.2f} GB)"
    if _quantized_loading(cfg, fsdp, cfg.distributed.loading) == "rank0":
        who = f"rank 0 first loads the whole 4-bit base into CPU RAM {size} and sends the other processes their parts"
    else:
        where = "into CPU RAM" if fsdp else "onto its device"
        who = f"each of the {sharding.nproc} processes first loads the whole 4-bit base {where} {size} and then "
        who += "keeps its part"
    log(f"{who}; setup, not in the plan below")


def _plan_trainer_for_config(cfg, path, shape, placement, memory, sharding, log):
    """`plan_for_config` for a Trainer stage: its records as the stage feeds them (`trainer_pass`)."""
    from ayar.data.dataset import load_splits
    from ayar.models.load import load_tokenizer

    tok, records = None, []
    if _has_tokenizer(path):
        tok, records = load_tokenizer(path), load_splits(cfg.data, seed=cfg.training.seed).train
    else:
        log(f"{path} has no tokenizer: planning rows of data.max_length={cfg.data.max_length} tokens (the worst case)")
    return plan_trainer_for(shape, cfg, tok, records, placement, memory, sharding)


def _has_tokenizer(path: str) -> bool:
    from pathlib import Path

    folder = Path(path)
    if not folder.is_dir():  # a hub id, resolved from the local cache by the tokenizer loader
        return True
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


class _Row:
    """A planned example of `n` tokens, all of them trained."""

    def __init__(self, n: int):
        self.input_ids = self.labels = range(n)
        self.n_trained = n


def return_memory(asked: bool | None, plan, sharding=None) -> bool:
    """Whether freed memory is handed back at once: as asked (`training.return_memory`), or when the allocator's
    kept heap could outgrow what is available: glibc's peak RSS was measured up to 2x above what training holds
    (benchmarks/README.md), and 2.3x under FSDP (2.5x allowed), which gathers and frees each layer's weights twice a
    pass."""
    if asked is not None:
        return asked
    growth = 2.5 if sharding is not None and sharding.strategy == "fsdp" else 2.0
    return growth * plan.total > plan.available


def _check_memory(
    cfg,
    shape: Shape,
    examples,
    placement: Placement,
    packed: bool,
    why_not: str | None,
    say,
    sharding=None,
    compute=None,
):
    """(memory plan, gradient checkpointing, return memory). Checkpointing: `training.gradient_checkpointing`,
    or auto: when needed to fit. Return memory: `return_memory` (as asked, or when the plan is tight: returning
    costs speed).
    `sharding`: several processes, planned per process (on a CPU they share this machine's RAM); `compute`: the run's
    autocast dtype (`plan_memory_for`)."""
    layout = Layout(rows_per_pass(cfg.training, placement.device, why_not is None), packed, why_not is None)
    available = _available_per_process(placement.device, sharding)
    found = plan_memory_for(shape, cfg, examples, placement, layout, available, sharding, compute)
    return _judge_memory(cfg, *found, say, sharding)


def _available_per_process(device: str, sharding) -> int | None:
    """Several processes on a CPU share this machine's RAM; None: the device's own free memory."""
    if sharding is None or device != "cpu":
        return None
    from ayar.training.memory import cpu_memory_per_process

    return cpu_memory_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", sharding.nproc)))


def _judge_memory(cfg, plan, fixes, layout, say, sharding=None):
    """(memory plan, gradient checkpointing, return memory) of a planned run: said when it fits, refused (or warned
    of: `training.memory_check`) with the settings that would fit when it does not."""
    release = return_memory(cfg.training.return_memory, plan, sharding)
    gb = lambda b: f"{b / 2**30:.1f} GB"  # noqa: E731
    if plan.fits:
        auto = (
            " (gradient checkpointing on: the run would not fit without it)"
            if layout.checkpointing and cfg.training.gradient_checkpointing is None
            else ""
        )
        each = " per process" if sharding is not None else ""
        say(
            f"memory predicted peak {gb(plan.total)}{each} of {gb(plan.available)} available{each}{auto}"
            + (", freed memory returned at once" if release else "")
        )
        return plan, layout.checkpointing, release
    message = (
        f"predicted peak memory {gb(plan.total)} exceeds the {gb(plan.available)} available ({plan.device}):\n"
        f"{plan.table()}\n"
        + ("settings that would fit: " + "; ".join(fixes) if fixes else "no single setting change found that fits")
    )
    if cfg.training.memory_check == "strict":
        raise AyarError(message + "\n(train anyway with training.memory_check=warn)")
    say(f"warning: {message}")
    return plan, layout.checkpointing, release


def shape_of(hf_config, cfg) -> Shape:
    """The memory planner's sizes of the run's model (`model_shape`): its config, the run's LoRA targets, rank and
    modules trained in full beside them, and the dtype its weights are stored in (a loaded model's config names the
    dtype it was loaded in)."""
    from ayar.models.load import stored_dtype
    from ayar.training.memory import model_shape

    stored = _name(stored_dtype(cfg.model.name))
    return model_shape(hf_config, cfg.lora.target_modules, cfg.lora.r, stored, cfg.lora.modules_to_save)


def _name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")
