"""`ayar config import FILE`: a LLaMA-Factory or Axolotl training YAML as an ayar config, with the list of what
could not be mapped (and what ayar does not need). Keys both tools share with Hugging Face go through the alias
table (config/aliases.py); this module adds what is particular to each tool: method, stage, datasets,
precision."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ayar.config.aliases import ALIASES
from ayar.errors import ConfigError

# settings of the other tools that ayar decides itself or does not need: listed, not mapped
NOT_NEEDED = {
    "do_train",
    "do_eval",
    "do_predict",
    "overwrite_cache",
    "overwrite_output_dir",
    "preprocessing_num_workers",
    "dataloader_num_workers",
    "plot_loss",
    "save_only_model",
    "resume_from_checkpoint",
    "template",
    "tokenizer_type",
    "model_type",
    "is_llama_derived_model",
    "strict",
    "tf32",
    "flash_attention",
    "xformers_attention",
    "logging_dir",
    "dataset_prepared_path",
    "wandb_watch",
    "wandb_log_model",
    "local_rank",
    "special_tokens",
    "train_on_inputs_default",
    "pad_to_sequence_len",
    "eval_sample_packing",
}
LF_STAGES = {"sft": "sft", "dpo": "dpo", "kto": "dpo", "rm": "reward"}
LF_PREF_LOSS = {"sigmoid": "dpo", "ipo": "ipo", "orpo": "orpo", "simpo": "simpo"}
AXOLOTL_TYPES = {"alpaca": "alpaca", "sharegpt": "sharegpt", "chat_template": "messages", "completion": "text"}


# the types of the keys this module reads itself (the alias table's go through ayar's own validation)
_NUMBER = (int, float)
TYPES = {
    "stage": str,
    "finetuning_type": str,
    "dataset": str,
    "dataset_dir": str,
    "quantization_bit": int,
    "pref_loss": str,
    "pref_beta": _NUMBER,
    "use_dora": bool,
    "pissa_init": bool,
    "max_samples": int,
    "val_size": _NUMBER,
    "bf16": (bool, str),
    "fp16": bool,
    "adapter": str,
    "load_in_4bit": bool,
    "load_in_8bit": bool,
    "lora_target_linear": bool,
    "val_set_size": _NUMBER,
    "rl": str,
    "datasets": list,
}


@dataclass
class Imported:
    tool: str
    config: dict  # ours, shaped like an ayar YAML
    unmapped: list[str] = field(default_factory=list)  # "key: why"
    ignored: list[str] = field(default_factory=list)  # keys ayar does not need


def detect_tool(raw: dict) -> str:
    if any(k in raw for k in ("finetuning_type", "dataset", "cutoff_len")) and "datasets" not in raw:
        return "llama-factory"
    if any(k in raw for k in ("datasets", "base_model", "adapter", "sequence_len", "micro_batch_size")):
        return "axolotl"
    raise ConfigError(
        "this is neither a LLaMA-Factory config (finetuning_type, dataset, ...) nor an Axolotl one "
        "(base_model, datasets, ...); write an ayar config (see examples/)"
    )


def import_config(raw: dict, source_dir: Path) -> Imported:
    if not isinstance(raw, dict):
        raise ConfigError("the file's top level must be a mapping of settings")
    tool = detect_tool(raw)
    out = Imported(tool, {})
    rest = {}
    for key, value in raw.items():
        wanted = TYPES.get(key)
        bad = (
            wanted is not None
            and value is not None
            and (not isinstance(value, wanted) or (isinstance(value, bool) and bool not in _tuple(wanted)))
        )
        if key == "datasets" and not bad and value is not None:
            bad = not all(isinstance(d, dict) for d in value)
        if bad:
            out.unmapped.append(f"{key}: {value!r} (not the type {tool} expects here)")
        else:
            rest[key] = value
    (_llama_factory if tool == "llama-factory" else _axolotl)(rest, out, source_dir)
    _distributed(rest, out, source_dir)
    ours = _our_names()
    passthrough = {}
    for key, value in rest.items():
        if key in NOT_NEEDED:
            out.ignored.append(key)
        elif key in ALIASES or key in ours:
            passthrough[key] = value
        elif value is None or value is False:
            out.ignored.append(key)  # an unset option
        else:
            out.unmapped.append(f"{key}: {value!r} (no ayar setting)")
    from ayar.config.aliases import normalize
    from ayar.config.schema import TrainConfig

    out.config = normalize({**out.config, **passthrough}, TrainConfig)  # aliases and flat keys to their sections
    return out


# FSDP's sharding strategies as accelerate, transformers and Axolotl spell them -> distributed.shard
FSDP_SHARDS = {"FULL_SHARD": "full", "1": "full", "HYBRID_SHARD": "hybrid", "4": "hybrid"}


def fsdp_shard(*values) -> tuple[str | None, str | None]:
    """ayar's `distributed.shard` from FSDP's sharding settings as accelerate, transformers and Axolotl give them
    (`sharding_strategy`, and `reshard_after_forward`, which FSDP2 takes as true/false and accelerate's FSDP1 takes as
    a strategy's name or number): (shard, None), or (None, why ayar cannot run it)."""
    names = {str(v).strip().upper() for v in values if v is not None and str(v).strip().lower() not in ("true", "yes")}
    if names & {"FALSE", "NO", "0"}:
        return None, "reshard_after_forward false (ayar's FSDP frees a layer's gathered weights after its forward)"
    unknown = sorted(n for n in names if n not in FSDP_SHARDS)
    if unknown:
        return None, f"{', '.join(unknown)} (ayar's FSDP: FULL_SHARD, or HYBRID_SHARD within each machine)"
    shards = {FSDP_SHARDS[n] for n in names} - {"full"}
    return (shards.pop() if shards else "full"), None


def zero_stage(value) -> tuple[int | None, str | None]:
    """ayar's `distributed.zero_stage` from a DeepSpeed ZeRO stage as a file or accelerate's flag gives it:
    (stage, None), or (None, why ayar cannot run it)."""
    if str(value).strip() in ("2", "3"):
        return int(str(value).strip()), None
    said = "no ZeRO stage" if value is None else f"ZeRO stage {value}"
    return None, f"{said}: ayar runs DeepSpeed ZeRO-2 (gradients and optimizer states split) or ZeRO-3 (weights too)"


def deepspeed_offload(devices: list[str]) -> tuple[bool | None, str | None]:
    """ayar's `distributed.offload` from DeepSpeed's offload devices (optimizer's, parameters'): (offload, None), or
    (None, why ayar cannot run it)."""
    if "nvme" in devices:
        return None, "offload to NVMe: ayar offloads to CPU RAM (distributed.offload), or not at all"
    return "cpu" in devices, None


# transformers' `fsdp` words (TrainingArguments.fsdp, Axolotl's `fsdp` list) naming a sharding strategy
_FSDP_WORDS = {"full_shard", "shard_grad_op", "no_shard", "hybrid_shard", "hybrid_shard_zero2"}
# FSDP settings of the other tools that ayar decides itself (one FSDP2 unit per decoder layer, sharded checkpoints,
# its own loading: distributed.loading)
FSDP_OURS = {
    "version",
    "auto_wrap_policy",
    "transformer_layer_cls_to_wrap",
    "min_num_params",
    "state_dict_type",
    "cpu_ram_efficient_loading",
    "sync_module_states",
    "use_orig_params",
    "limit_all_gathers",
    "backward_prefetch",
    "forward_prefetch",
}


@dataclass
class DeepSpeedFile:
    """What ayar takes from a DeepSpeed JSON config (a tool's `deepspeed: FILE`, accelerate launch's
    `--deepspeed_config_file`): None where the file says "auto" or nothing; ayar writes the rest of DeepSpeed's
    config from the run's own."""

    stage: object = None
    offload: list[str] = field(default_factory=list)  # offload_optimizer / offload_param devices named
    grad_accum: object = None
    clipping: object = None
    unused: list[str] = field(default_factory=list)  # the file's other settings


def read_deepspeed_file(path: Path, where: str) -> DeepSpeedFile:
    try:
        ds = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it ({e.strerror or e}); give a readable DeepSpeed JSON file") from e
    except ValueError as e:
        raise ConfigError(f"{where}: not valid JSON ({e}); fix the file") from e
    return deepspeed_settings(ds, where)


def deepspeed_settings(ds, where: str) -> DeepSpeedFile:
    """A DeepSpeed config (parsed) as what ayar takes from it."""
    zero = ds.get("zero_optimization", {}) if isinstance(ds, dict) else None
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: not a DeepSpeed config (a JSON object, its zero_optimization an object)")

    def given(d: dict, key: str):
        return None if d.get(key, "auto") == "auto" else d[key]

    offload = [
        o.get("device", "none") if isinstance(o := zero.get(k), dict) else "none"
        for k in ("offload_optimizer", "offload_param")
    ]
    unused = sorted(
        k
        for k, v in ds.items()
        if v != "auto" and k not in ("zero_optimization", "gradient_accumulation_steps", "gradient_clipping")
    )
    unused += sorted(
        f"zero_optimization.{k}"
        for k, v in zero.items()
        if v != "auto" and k not in ("stage", "offload_optimizer", "offload_param")
    )
    return DeepSpeedFile(
        given(zero, "stage"),
        [str(d).lower() for d in offload if str(d).lower() not in ("none", "auto")],
        given(ds, "gradient_accumulation_steps"),
        given(ds, "gradient_clipping"),
        unused,
    )


def _distributed(rest: dict, out: Imported, source_dir: Path) -> None:
    """`deepspeed: FILE` (both tools) and Axolotl's / transformers' `fsdp` + `fsdp_config` as the distributed
    section."""
    ds_file, fsdp, fsdp_config = rest.pop("deepspeed", None), rest.pop("fsdp", None), rest.pop("fsdp_config", None)
    rest.pop("fsdp_version", None)  # ayar runs FSDP2
    if ds_file and (fsdp or fsdp_config):
        out.unmapped.append("deepspeed and fsdp: both given (ayar runs one: set distributed.strategy)")
        return
    if isinstance(ds_file, dict):  # transformers' TrainingArguments take the config itself too
        ds = deepspeed_settings(ds_file, "deepspeed")
    elif isinstance(ds_file, str) and ds_file:
        path = Path(ds_file).expanduser()
        path = path if path.is_absolute() else source_dir / path
        if not path.is_file():
            out.unmapped.append(
                f"deepspeed: {ds_file!r} (not found here: set distributed.strategy: deepspeed and "
                "distributed.zero_stage: 2 or 3, distributed.offload)"
            )
            return
        ds = read_deepspeed_file(path, f"deepspeed: {ds_file}")
    elif ds_file:
        out.unmapped.append(f"deepspeed: {ds_file!r} (a DeepSpeed JSON file's path)")
        return
    if ds_file:
        ds_file = ds_file if isinstance(ds_file, str) else "(the config inline)"
        stage, why = zero_stage(ds.stage)
        if why:
            out.unmapped.append(f"deepspeed: {ds_file!r} ({why}; or distributed.strategy ddp)")
            return
        _put(out.config, "distributed.strategy", "deepspeed")
        _put(out.config, "distributed.zero_stage", stage)
        offload, why = deepspeed_offload(ds.offload)
        if why:
            out.unmapped.append(f"deepspeed: {ds_file!r} ({why})")
        elif offload:
            _put(out.config, "distributed.offload", True)
        if ds.unused:
            out.ignored.append(f"deepspeed: {ds_file} ({', '.join(ds.unused)}: ayar's, from the run's config)")
    if not fsdp and not fsdp_config:
        return
    if not isinstance(fsdp, (str, list, bool, type(None))):
        out.unmapped.append(f"fsdp: {fsdp!r} (transformers' fsdp words, e.g. full_shard auto_wrap)")
        return
    words = [
        str(w).lower() for w in (fsdp.split() if isinstance(fsdp, str) else fsdp if isinstance(fsdp, list) else [])
    ]
    if not isinstance(fsdp_config, (dict, type(None))):
        out.unmapped.append(f"fsdp_config: {fsdp_config!r} (a mapping of FSDP settings)")
    options = {str(k).removeprefix("fsdp_"): v for k, v in fsdp_config.items()} if isinstance(fsdp_config, dict) else {}
    named = [w for w in words if w in _FSDP_WORDS]
    out.unmapped += [f"fsdp: {w}" for w in words if w not in _FSDP_WORDS and w not in ("auto_wrap", "offload")]
    shard, why = fsdp_shard(*named, options.pop("sharding_strategy", None), options.pop("reshard_after_forward", None))
    if why:
        out.unmapped.append(
            f"fsdp: {why}; for gradients and optimizer states split alone distributed.strategy deepspeed, zero_stage 2"
        )
        return
    _put(out.config, "distributed.strategy", "fsdp")
    if shard != "full":
        _put(out.config, "distributed.shard", shard)
    if "offload" in words or options.pop("offload_params", False) in (True, "true"):
        _put(out.config, "distributed.offload", True)
    if options.pop("activation_checkpointing", False) in (True, "true"):
        _put(out.config, "training.gradient_checkpointing", True)
    ours = sorted(k for k in options if k in FSDP_OURS)
    if ours:
        out.ignored.append(f"fsdp_config ({', '.join(ours)}: ayar's)")
    out.unmapped += [f"fsdp_config.{k}: {v!r}" for k, v in options.items() if k not in FSDP_OURS]


def _tuple(t) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def _our_names() -> set[str]:
    """ayar's own keys a flat file may use: top-level fields and every section's field names."""
    import dataclasses
    import typing

    from ayar.config.schema import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    names = set()
    for f in dataclasses.fields(TrainConfig):
        sub = hints[f.name]
        names |= {g.name for g in dataclasses.fields(sub)} if dataclasses.is_dataclass(sub) else {f.name}
    return names


def _put(cfg: dict, path: str, value) -> None:
    node = cfg
    *sections, name = path.split(".")
    for s in sections:
        node = node.setdefault(s, {})
    node[name] = value


def _precision(rest: dict, out: Imported) -> None:
    bf16, fp16 = rest.pop("bf16", None), rest.pop("fp16", None)
    if bf16 is True:
        _put(out.config, "model.dtype", "bfloat16")
    elif fp16 is True:
        _put(out.config, "model.dtype", "float16")
    elif bf16 == "auto":
        _put(out.config, "model.dtype", "auto")


def _llama_factory(rest: dict, out: Imported, source_dir: Path) -> None:
    stage = rest.pop("stage", "sft")
    if stage not in LF_STAGES:
        out.unmapped.append(f"stage: {stage!r} (ayar trains sft, dpo, kto (as dpo), rm (as reward) and grpo)")
    else:
        _put(out.config, "stage", LF_STAGES[stage])
        if stage == "kto":
            _put(out.config, "preference.loss", "kto")
    if "pref_loss" in rest:
        loss = rest.pop("pref_loss")
        if loss in LF_PREF_LOSS:
            _put(out.config, "preference.loss", LF_PREF_LOSS[loss])
        else:
            out.unmapped.append(f"pref_loss: {loss!r}")
    if "pref_beta" in rest:
        _put(out.config, "preference.beta", rest.pop("pref_beta"))
    kind = rest.pop("finetuning_type", "lora")
    quant = rest.pop("quantization_bit", None)
    dora = rest.pop("use_dora", False)
    if kind == "full":
        _put(out.config, "method", "full")
    elif kind == "lora":
        _put(out.config, "method", ("q" if quant == 4 else "") + ("dora" if dora else "lora"))
        if quant not in (None, 4):
            out.unmapped.append(f"quantization_bit: {quant} (ayar quantizes bases to 4 bits only)")
    else:
        out.unmapped.append(f"finetuning_type: {kind!r} (ayar: lora, qlora, dora, full)")
    if rest.pop("pissa_init", False):
        _put(out.config, "lora.init", "pissa")
    if "max_samples" in rest:
        _put(out.config, "data.max_rows", rest.pop("max_samples"))
    if "val_size" in rest:
        _put(out.config, "data.val_ratio", rest.pop("val_size"))
    _precision(rest, out)
    names = rest.pop("dataset", None)
    dataset_dir = source_dir / (rest.pop("dataset_dir", None) or "data")
    if names is not None:
        sources = [_lf_dataset(n.strip(), dataset_dir, source_dir, out) for n in str(names).split(",") if n.strip()]
        sources = [s for s in sources if s]
        if sources:
            _put(out.config, "data.train", sources)  # a list: a source with its format is a mapping
    for key in ("eval_dataset", "eval_strategy", "per_device_eval_batch_size"):
        if key in rest:
            out.unmapped.append(f"{key}: {rest.pop(key)!r} (ayar holds out data.val_ratio or reads data.validation)")


def _lf_dataset(name: str, dataset_dir: Path, source_dir: Path, out: Imported):
    """A LLaMA-Factory dataset name: a file, or an entry of its dataset_info.json registry."""
    if (source_dir / name).exists():
        return str((source_dir / name).resolve())
    info_file = dataset_dir / "dataset_info.json"
    try:
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    except ValueError:
        raise ConfigError(f"{info_file}: not valid JSON") from None
    entry = info.get(name) if isinstance(info, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
        out.unmapped.append(f"dataset: {name!r} (not a file here, nor a file entry of {info_file}: set data.train)")
        return None
    source = {"path": str((dataset_dir / entry["file_name"]).resolve())}
    fmt = entry.get("formatting", "alpaca")
    source["format"] = {"alpaca": "alpaca", "sharegpt": "sharegpt"}.get(fmt, "auto")
    columns = entry.get("columns") if isinstance(entry.get("columns"), dict) else {}
    ours = {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "system": "system",
        "history": "history",
        "messages": "conversations" if fmt == "sharegpt" else "messages",
    }
    mapped = {ours[k]: v for k, v in columns.items() if k in ours and ours[k] != v}
    if mapped:
        source["columns"] = mapped
    return source


def _axolotl(rest: dict, out: Imported, source_dir: Path) -> None:
    adapter = rest.pop("adapter", None)
    four_bit = rest.pop("load_in_4bit", False)
    if rest.pop("load_in_8bit", False):
        out.unmapped.append("load_in_8bit: true (ayar quantizes bases to 4 bits only)")
    if adapter in ("lora", "qlora"):
        _put(out.config, "method", "qlora" if adapter == "qlora" or four_bit else "lora")
    elif adapter is None:
        _put(out.config, "method", "full")
    else:
        out.unmapped.append(f"adapter: {adapter!r}")
    if rest.pop("lora_target_linear", False):
        _put(out.config, "lora.target_modules", "all-linear")
    if "val_set_size" in rest:
        _put(out.config, "data.val_ratio", rest.pop("val_set_size"))
    _precision(rest, out)
    rl = rest.pop("rl", None)
    if rl in ("dpo", "ipo", "orpo", "kto", "simpo"):
        _put(out.config, "stage", "dpo")
        _put(out.config, "preference.loss", rl)
    elif rl:
        out.unmapped.append(f"rl: {rl!r}")
    sources = []
    for d in rest.pop("datasets", None) or []:
        if not isinstance(d.get("path"), str) or not d["path"]:
            out.unmapped.append(f"datasets: {d!r} (no path)")
            continue
        path = Path(d["path"]).expanduser()
        local = path if path.is_absolute() else source_dir / path
        if not local.exists():
            out.unmapped.append(
                f"datasets: {d.get('path')!r} (not a local file: download it and point data.train at it)"
            )
            continue
        kind = d.get("type", "alpaca")
        kind = kind if isinstance(kind, str) else "auto"
        sources.append({"path": str(local.resolve()), "format": AXOLOTL_TYPES.get(kind.split(".")[0], "auto")})
    if sources:
        _put(out.config, "data.train", sources)
