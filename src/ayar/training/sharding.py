"""FSDP (`distributed.strategy: fsdp`). ayar's own loop (stage sft) splits the model itself with torch's FSDP2
(`fully_shard`): one unit per decoder layer (the classes the model names in `_no_split_modules`, as accelerate's
transformer auto-wrap does) and the rest (embeddings, final norm, head) in the root unit. Each rank keeps 1/N of
every weight, gradient and optimizer state; a layer's weights are gathered whole only while it computes (forward,
and again in backward).

The loss is computed inside the root unit's forward (loss.py `WithLoss`): the loss reads the head's weight itself
(training/loss.py, never the full logits), and FSDP hands out whole weights only inside a unit's forward. Gradients
are summed across ranks (the loss is already divided by the global trained-token count, training/loop.py), in
reduce-scatters of plain sums (gloo has no pre-scaled sum), once per optimizer step: the accumulation micro-steps
skip the sync.

Checkpoints are sharded (torch.distributed.checkpoint, `save_shards`): every rank writes its own part of the trained
weights and optimizer states into the checkpoint folder, and so is the best model early stopping keeps. At the end
an adapter is gathered whole on rank 0 and saved as a plain one; a full fine-tune is saved by parts where the plan
says so (`save_by_parts`: each rank writes its parts, rank 0 joins the files a weight at a time), else gathered on
rank 0.

The Trainer-based stages (DPO family, reward, GRPO, classification) run on accelerate's FSDP plugin (FSDP2, the
same units: accelerate's transformer auto-wrap), asked for through TrainingArguments (`trainer_args`); their
weights are gathered whole at the end by the same `trained_state`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from ayar.errors import ConfigError
from ayar.kernels import base_model
from ayar.models.adapters import four_bit_layers
from ayar.training.checkpoint import SHARDS
from ayar.training.distributed import Replicas, World, written_together
from ayar.training.loss import WithLoss


def layer_classes(model) -> set[type]:
    """The module classes FSDP gives a unit each: the model's own `_no_split_modules` (its decoder layer)."""
    base = base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    found = {type(m) for m in base.modules() if type(m).__name__ in names}
    if not found:
        raise ConfigError(
            f"distributed.strategy fsdp: {type(base).__name__} names no decoder layer class (_no_split_modules) to "
            "shard by; use distributed.strategy: ddp"
        )
    return found


def mesh_for(dcfg, device: str, world_size: int):
    """The process mesh: one dimension (full shard), or nodes x processes per node (hybrid: split within a node,
    replicated across nodes)."""
    from torch.distributed.device_mesh import init_device_mesh

    kind = "cuda" if device.startswith("cuda") else "cpu"
    if dcfg.shard == "full":
        return init_device_mesh(kind, (world_size,))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if world_size % per_node:
        raise ConfigError(f"distributed.shard hybrid: {world_size} processes do not divide into nodes of {per_node}")
    return init_device_mesh(kind, (world_size // per_node, per_node), mesh_dim_names=("replicate", "shard"))


def shard(
    model, dcfg, device: str, world_size: int, rank: int, parts_from: str | None = None, every_rank: bool = False
) -> WithLoss:
    """`model` split across the ranks in place; the returned root unit computes the loss. The weights come from
    rank 0 (the other ranks may hold the model empty: meta device, models/load.py `empty_model`, and receive their
    parts as it is split, so no rank but 0 holds the whole model) or, with `parts_from` (a model folder:
    `distributed.loading: parts`, every rank holding the model empty), each rank reads its own parts of the weights
    from the folder's files and no rank ever holds the whole model; the adapter, made as on a loaded model
    (models/adapters.py), is rank 0's. `every_rank`: every process loaded the weights (4-bit weights, quantized by
    each process alike, are then kept where they are rather than sent)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = mesh_for(dcfg, device, world_size)
    # pinned (page-locked) CPU memory speeds copies to GPUs; torch refuses to pin where there is no accelerator
    offload = CPUOffloadPolicy(pin_memory=device.startswith("cuda")) if dcfg.offload else OffloadPolicy()
    classes = tuple(layer_classes(model))
    units = [m for m in model.modules() if isinstance(m, classes)]
    # what rank 0 sends, kept until the parts are handed out: its whole weights, or all but those in the files
    # (named as in the root unit below)
    four_bit = _four_bit(model)
    whole = {f"model.{k}": v for k, v in model.state_dict().items() if not v.is_meta} if rank == 0 else {}
    # a 4-bit weight's quant state (its entries in the state dict) is in every process already
    # (`four_bit_from_rank0`, or quantized by each as it loaded); so is the weight where every process loaded it
    kept = four_bit if every_rank else set()
    whole = {k: v for k, v in whole.items() if k not in kept and not {k.rsplit(".", n)[0] for n in (1, 2)} & four_bit}
    in_files = [f"model.{name}" for name, p in model.named_parameters() if p.is_meta] if parts_from else []
    if rank == 0 and not parts_from and not every_rank and not four_bit:
        _weights_out(model)  # in `whole` alone from here, each freed once sent: never beside rank 0's part
    for unit in units:
        fully_shard(unit, mesh=mesh, offload_policy=offload)
    root = fully_shard(WithLoss(model), mesh=mesh, offload_policy=offload)
    for unit in [*units, root]:
        unit.set_gradient_divide_factor(1.0)  # sums: each rank's loss is its share of the global mean already
        unit.set_force_sum_reduction_for_comms(True)
    every_weight = not parts_from and not kept
    _from_rank0(root, whole, mesh.device_type, bool(dcfg.offload), every_weight, units)
    for _, layer in four_bit_layers(model):  # the block scales compute where the gathered weights do
        layer.quant_state.to(mesh.device_type)
    if parts_from:
        from ayar.models.adapters import init_dora_magnitudes

        _read_parts(root, parts_from, in_files)
        init_dora_magnitudes(model, rows=lambda t: t.to_local(), whole=lambda t: t.full_tensor())
    return root


class Fsdp(Replicas):
    """The loop's model split by FSDP (`shard`): the loss runs through the root unit, gradients are reduce-scattered
    in the step's last backward only, checkpoints and the best weights are written by parts (`save_shards`)."""

    split = SHARDS
    best_whole = False  # kept by parts on disk, never gathered
    lockstep = True

    def __init__(self, model, plan, world: World):
        self.model, self.world = model, world
        every_rank = plan.loading == "every_rank"
        self.root = shard(model, plan.distributed, plan.device, world.size, world.rank, plan.parts_from, every_rank)
        self.trained = [p for p in model.parameters() if p.requires_grad]
        self.scaler = self.make_scaler(plan.device) if plan.loss_scaling else None

    def make_scaler(self, device: str):
        """Each process holds a part of every gradient: an overflow found in one part skips the step everywhere."""
        return _AgreedScaler(device.split(":")[0])

    def forward(self, batch: dict, loss_fn=None, fused: bool = False, autocast=None, last: bool = True):
        self.root.set_requires_gradient_sync(last)
        return self.root(batch, loss_fn, fused, autocast)

    def exchange_gradients(self) -> None:
        pass  # reduce-scattered in the last micro-batch's backward

    def write_split(self, folder: Path, optimizer=None) -> None:
        save_shards(folder, self.root, optimizer)

    def read_split(self, folder: Path, optimizer=None) -> None:
        load_shards(folder, self.root, optimizer)

    def whole_state(self) -> dict | None:
        return trained_state(self.root)


class _AgreedScaler(torch.amp.GradScaler):
    """torch's GradScaler with its overflow check summed over the processes after unscaling, so that all skip or all
    take the step. torch's ShardedGradScaler does the same, but hands a fused AdamW a found-overflow tensor of shape
    [1] where it takes a scalar and the step fails (torch 2.13, seen on CPU)."""

    def unscale_(self, optimizer) -> None:
        import torch.distributed as dist

        super().unscale_(optimizer)
        for found in self._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            dist.all_reduce(found)


def _four_bit(model) -> set[str]:
    """The 4-bit weights (QLoRA's base) by name as the root unit names them, with their quant states under the same
    prefix. (A layer of a model being trained never repacks its weight for bitsandbytes' CPU inference kernel,
    models/adapters.py `_keep_4bit_layout`: under FSDP the repacked copy would be the gathered one, freed after the
    forward.)"""
    return {f"model.{name}.weight" for name, _ in four_bit_layers(model)}


def four_bit_from_rank0(model, rank: int) -> None:
    """Rank 0's 4-bit layers (QLoRA's base, loaded and quantized by rank 0 alone) made known to the others, which
    hold the model empty, its 4-bit layers too (models/load.py `empty_model`); collective, a layer at a time:
    each packed weight's shape and storage dtype, left empty (its parts come as the model is split, `shard`), and
    its quant state (the NF4 block scales, a thirty-second of the packed weight; no parameters, so FSDP would not
    send them), kept whole by every process as it would be had each quantized the base itself."""
    import torch.distributed as dist
    from bitsandbytes.functional import QuantState
    from bitsandbytes.nn import Params4bit

    for _, layer in four_bit_layers(model):
        w = layer.weight
        sent = [(tuple(w.shape), w.dtype, w.quant_state.as_dict(packed=True)) if rank == 0 else None]
        dist.broadcast_object_list(sent, src=0)
        if rank == 0:
            continue
        shape, dtype, state = sent[0]
        qs = QuantState.from_dict(state, device=torch.device("cpu"))
        # built here, not by bitsandbytes' `Params4bit.from_prequantized`: it puts the weight and its quant state
        # on one device, and the weight stays empty (meta) while the state is real
        empty = torch.empty(shape, dtype=dtype, device="meta")
        layer.weight = Params4bit(
            empty,
            quant_state=qs,
            blocksize=qs.blocksize,
            compress_statistics=qs.nested,
            quant_type=qs.quant_type,
            quant_storage=dtype,
            module=layer,
            bnb_quantized=True,
        )
        layer.quant_state = qs


def _weights_out(model) -> None:
    """Rank 0's weights taken out of its model, which is left empty as the others' (meta device; a weight two
    modules share stays shared): the state dict taken before holds them alone, and `_from_rank0` frees each unit's
    once it is sent. Split first, rank 0 would hold its part of every weight beside its whole model."""
    from ayar.models.load import replace_parameters

    def empty(p):
        return torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)

    replace_parameters(model, empty, lambda p: not p.is_meta)


def _from_rank0(
    root: WithLoss, whole: dict, device_type: str, offload: bool, every_weight: bool = True, units: list = ()
) -> None:
    """Every rank's part of rank 0's weights (`whole`, {} elsewhere; `every_weight`: all of the model's), sent by
    rank 0 (collective) a unit at a time (each of `units`, then the root's own). A rank holding the model empty
    (meta device; rank 0 too, its weights in `whole` alone: `_weights_out`) gets memory for a unit's parts just
    before they come, and rank 0 drops that unit's whole weights once sent: it never holds its part of every weight
    beside its whole model. Buffers (rotary frequencies, real in an empty model) are copied from rank 0 as they are."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = "cpu" if offload else device_type

    def materialize(module) -> None:  # memory for the parts still empty; received parts and buffers as they are
        module._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)

    if every_weight:  # checked before anything is sent, said by every rank
        missing = [n for n, _ in root.named_parameters() if n not in whole] if dist.get_rank() == 0 else []
        said = [missing]
        dist.broadcast_object_list(said, src=0)
        if said[0]:
            raise RuntimeError(f"rank 0 has no weights for {', '.join(said[0][:5])} to send")
    names = list(root.state_dict())
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=offload, strict=False)
    for name, unit in root.named_modules():  # each unit loads its own (the root's load copies every part in)
        if any(unit is u for u in units):
            materialize(unit)
            prefix = f"{name}."
            set_model_state_dict(unit, {n.removeprefix(prefix): whole.pop(n) for n in names if n.startswith(prefix)
                                        and n in whole}, options=opts)  # fmt: skip
    materialize(root)
    set_model_state_dict(root, whole, options=opts)
    whole.clear()
    for buffer in root.buffers():
        dist.broadcast(buffer, src=0)


def _read_parts(root: WithLoss, folder: str, names: list[str]) -> None:
    """Each rank reads its own parts of the weights `names` (the root's parameter names) from the safetensors files
    in `folder`, converted to the parameters' dtype: torch.distributed.checkpoint's Hugging Face reader reads just
    the slices a rank holds. Names as before peft wrapped the model (models/adapters.py `base_name`); a weight two
    parameters start from (peft's copy of a module trained in full) is read once and copied."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load

    from ayar.models.adapters import base_name

    params = dict(root.named_parameters())
    wanted, copies = {}, []
    for name in names:
        key = base_name(name.removeprefix("model."))
        if key in wanted:
            copies.append((params[name], wanted[key]))
        else:
            wanted[key] = params[name]
    load(wanted, storage_reader=HuggingFaceStorageReader(folder))
    with torch.no_grad():
        for target, source in copies:
            target.copy_(source)


def file_weights(folder) -> dict[str, tuple[int, ...]]:
    """The weights a model folder's safetensors files hold, name -> shape, read from the files' headers."""
    from safetensors import safe_open

    held = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                held[key] = tuple(f.get_slice(key).get_shape())
    return held


def not_in_files(model, folder) -> list[str]:
    """The weights of `model` (built empty, or loaded) that the safetensors files in `folder` do not hold under the
    same name and shape: where there are none, each rank can read its own parts (`shard(parts_from=folder)`)."""
    held = file_weights(folder)
    return [name for name, p in model.named_parameters() if held.get(name) != tuple(p.shape)]


def trained_state(root) -> dict:
    """The trained weights of a model split by FSDP2 (our `WithLoss` root, or a model accelerate split) gathered
    whole, on rank 0 ({} on the others; every rank must call it), named as in the model's own state_dict (what
    `save_pretrained(state_dict=...)` takes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = _named_once(root, get_model_state_dict(root, options=opts))
    return {k.removeprefix("model."): v for k, v in state.items()} if isinstance(root, WithLoss) else state


def _named_once(root, state: dict) -> dict:
    """`state` without the second names of tied weights (a head tied to the embeddings): gathered, each name is a
    copy of its own, which save_pretrained would write twice; the first name is the one it keeps."""
    aliases = {n for n, _ in root.named_parameters(remove_duplicate=False)} - {n for n, _ in root.named_parameters()}
    return {k: v for k, v in state.items() if k not in aliases}


# save_pretrained's default largest file: a model under it is saved as one model.safetensors, as transformers does
MAX_FILE_BYTES = 50 * 1024**3
# torch's writer holds a process's part of a file twice while it writes it (the tensors' bytes, then the file's):
# each process writes its parts in files of this many bytes of weights, then rank 0 joins them into the saved files
CHUNK_BYTES = 512 * 1024**2


def save_by_parts(root: WithLoss, model, out: Path, world) -> None:
    """A full fine-tune split by FSDP saved where transformers loads it, without any process holding it whole
    (collective): every rank writes its parts of each weight (torch.distributed.checkpoint's Hugging Face writer,
    `CHUNK_BYTES` of weights at a time), then rank 0 joins them into the final safetensors files one weight at a
    time (torch's consolidation, as the writer's own `enable_consolidation` does, with the saved files' split) and
    writes the config as save_pretrained does, all in a temp folder renamed into place. Weights under the model's
    own names, a tied weight once (under its first name, as save_pretrained keeps it); the plan saves by parts only
    where those are the names the files hold (plan.weights_loading)."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ayar.fsutil import atomic_directory

    state = _named_once(root, get_model_state_dict(root, options=StateDictOptions()))  # each rank's parts (DTensors)
    state = {k.removeprefix("model."): v for k, v in state.items()}

    def write(folder: Path) -> None:
        writer = HuggingFaceStorageWriter(str(folder / SHARDS), _file_of(state, CHUNK_BYTES), save_distributed=True)
        save(state, storage_writer=writer)

    def complete(each) -> None:  # rank 0
        with atomic_directory(Path(out), fsync=True) as tmp:
            each(tmp)
            consolidate_safetensors_files(str(tmp / SHARDS), str(tmp), _file_of(state, MAX_FILE_BYTES))
            _as_save_pretrained_writes(tmp, model)

    written_together(world, complete, write)


def _file_of(state: dict, limit: int) -> dict[str, int]:
    """Which file (1..N) each weight goes to, in order, a new file when one would pass `limit` bytes."""
    out, index, size = {}, 1, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > limit:
            index, size = index + 1, 0
        out[name], size = index, size + nbytes
    return out


def _as_save_pretrained_writes(folder: Path, model) -> None:
    """The folder torch's writer made, as save_pretrained leaves one: one file named model.safetensors (several keep
    their model-0000i-of-0000N names and index, which are transformers' own), no per-rank parts; the config with the
    saved dtype and architecture, the generation config (transformers' save_distributed_checkpoint does the same)."""
    import shutil

    shutil.rmtree(folder / SHARDS)
    made = sorted(folder.glob("model-*-of-*.safetensors"))
    if len(made) == 1:
        made[0].rename(folder / "model.safetensors")
        (folder / "model.safetensors.index.json").unlink()
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    if model.is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, str(folder), config=model.config)
    model.config.save_pretrained(str(folder))
    if model.can_generate():
        model.generation_config.save_pretrained(str(folder))


def trainer_args(dcfg, rank0_loading: bool) -> dict:
    """The TrainingArguments fields that run a Trainer-based stage on accelerate's FSDP plugin: FSDP2, one unit per
    decoder layer (accelerate's transformer auto-wrap reads `_no_split_modules`, as `layer_classes` does), sharded
    checkpoints (one part per rank, torch.distributed.checkpoint), CPU offload when asked. With `rank0_loading`
    (the plan's) rank 0's weights are sent to the others as the model is split (`cpu_ram_efficient_loading`): they
    hold it empty (RunPlan.reads_weights)."""
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": True,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "state_dict_type": "SHARDED_STATE_DICT",
            "cpu_offload": bool(dcfg.offload),
            "cpu_ram_efficient_loading": rank0_loading,
        },
    }


def trainable_in_memory(model) -> None:
    """A model held empty (a rank but 0 under the Trainer stages' FSDP) gets memory, left unfilled, for the weights
    it trains (LoRA, a score head): accelerate matches the optimizer's parameters to their split parts by memory
    address, and every meta tensor has address 0, so all would be matched to one part. The values come from rank 0
    as the model is split; the frozen weights stay empty."""
    from ayar.models.load import replace_empty

    replace_empty(model, lambda p: torch.nn.Parameter(torch.empty_like(p, device="cpu")), lambda p: p.requires_grad)


@contextmanager
def accelerate_fsdp(on: bool):
    """While a Trainer makes its Accelerator (`on`: a run under strategy fsdp), accelerate's FSDP plugin as ayar's
    own loop splits the model:
    - mixed precision leaves each weight in the dtype ayar gave it (the base in the plan's dtype, adapters in fp32)
      and computes under accelerate's autocast, as data parallel does: accelerate's own bf16 policy would compute
      the adapters in bf16, sum their gradients across processes in bf16 and hand the loss bf16 logits (DPO's first
      loss was bf16's ln 2, 0.6914, where data parallel logs 0.6931);
    - on a CPU, accelerate starts its FSDP plugin only on accelerators: several CPU processes stay
      `MULTI_CPU`, plain data parallel, and the plugin is dropped without a word (accelerate/state.py). torch's
      FSDP2 runs on CPU over gloo (our own loop uses it), so a CPU run is given FSDP as a GPU run is, its offload
      (`distributed.offload`) without pinned memory, which torch refuses without an accelerator. The caller checks
      that the Trainer did get it (`trainer.is_fsdp_enabled`)."""
    if not on:
        yield
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    make = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        if fsdp_plugin is not None:  # set before accelerate's own: it keeps a policy it is given
            fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy()
        make(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if isinstance(fsdp_plugin.cpu_offload, CPUOffloadPolicy):
                fsdp_plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init
    try:
        yield
    finally:
        AcceleratorState.__init__ = make


def outputs_in_fp32(model) -> None:
    """`model`'s outputs (logits, scores, a loss computed inside) converted to fp32, as accelerate converts a data
    parallel model's under mixed precision (`Accelerator.prepare_model`); its FSDP2 path leaves that to the mixed
    precision policy, which would cast every split layer's output (`accelerate_fsdp` gives it none). Without it a
    reward model's loss was bf16 under FSDP, its adapter another than data parallel's. accelerate's own wrapper,
    which `unwrap_model` takes off as it takes off its own."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32

    model._original_forward = model.forward
    model.forward = MethodType(convert_outputs_to_fp32(model.forward.__func__), model)


def _state(root: WithLoss, optimizer=None) -> dict:
    """The trained weights (and the optimizer states, with an optimizer) of the split model, each rank its parts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    opts = StateDictOptions(ignore_frozen_params=True)
    if optimizer is None:
        return {"model": get_model_state_dict(root, options=opts)}
    model_state, optim_state = get_state_dict(root, optimizer, options=opts)
    return {"model": model_state, "optimizer": optim_state}


def save_shards(folder: Path, root: WithLoss, optimizer=None) -> None:
    """Every rank writes its part of the trained weights (and optimizer states) into `folder`/sharded (collective):
    a checkpoint, or with no optimizer the best model early stopping keeps, rather than gathered."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(root, optimizer), checkpoint_id=str(Path(folder) / SHARDS))


def load_shards(folder: Path, root: WithLoss, optimizer=None) -> None:
    """The trained weights (and optimizer states) `save_shards` wrote, each rank its part (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    state = _state(root, optimizer)
    dcp.load(state, checkpoint_id=str(Path(folder) / SHARDS))
    opts = StateDictOptions(ignore_frozen_params=True, strict=False)
    if optimizer is None:
        set_model_state_dict(root, state["model"], options=opts)
        return
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=opts)
