"""The names users already type: Hugging Face TrainingArguments, peft, TRL, LLaMA-Factory and Axolotl keys
accepted as aliases of ours (each noted once, naming ours), and a flat key at the top level routed to the one
section that has it (`learning_rate: 2e-4` means `training.learning_rate`). An alias and our name both given
with different values is an error, never a silent pick.

docs/config-aliases.md lists the table; tests/unit/config/test_aliases.py tests every row.
"""

from __future__ import annotations

from ayar.errors import ConfigError

# their name -> (our dotted path, how their value becomes ours or None to keep it)
ALIASES: dict[str, tuple[str, object]] = {
    "per_device_train_batch_size": ("training.batch_size", None),
    "micro_batch_size": ("training.batch_size", None),  # Axolotl
    "gradient_accumulation_steps": ("training.grad_accum", None),
    "num_train_epochs": ("training.epochs", None),
    "num_epochs": ("training.epochs", None),  # Axolotl
    "lr_scheduler_type": ("training.lr_scheduler", None),
    "lr_scheduler": ("training.lr_scheduler", None),
    "lr": ("training.learning_rate", None),
    "max_grad_norm": ("training.max_grad_norm", None),
    "ddp_timeout": ("distributed.timeout", None),
    "warmup_ratio": ("training.warmup_ratio", None),
    "logging_steps": ("training.logging_steps", None),
    "save_steps": ("training.save_steps", None),
    "eval_steps": ("training.eval_steps", None),
    "save_total_limit": ("training.save_total_limit", None),
    "optim": (
        "training.optimizer",
        {
            "adamw_torch": "adamw",
            "adamw_torch_fused": "adamw",
            "adamw_hf": "adamw",
            "adamw_bnb_8bit": "adamw_8bit",
            "adamw_8bit": "adamw_8bit",
            "adamw": "adamw",
        },
    ),
    "optimizer": (
        "training.optimizer",
        {
            "adamw_torch": "adamw",
            "adamw_torch_fused": "adamw",
            "adamw_bnb_8bit": "adamw_8bit",
            "adamw_8bit": "adamw_8bit",
            "adamw": "adamw",
        },
    ),
    "report_to": ("training.tracker", "tracker"),
    "run_name": ("training.run_name", None),  # TrainingArguments
    "wandb_project": ("training.project", None),  # Axolotl
    "wandb_name": ("training.run_name", None),  # Axolotl
    "early_stopping_patience": ("training.early_stopping_patience", None),
    "lora_r": ("lora.r", None),
    "lora_rank": ("lora.r", None),  # LLaMA-Factory
    "lora_alpha": ("lora.alpha", None),
    "lora_dropout": ("lora.dropout", None),
    "lora_target_modules": ("lora.target_modules", None),  # Axolotl
    "lora_target": ("lora.target_modules", "targets"),  # LLaMA-Factory: "all" or "q_proj,v_proj"
    "target_modules": ("lora.target_modules", None),  # peft
    "use_rslora": ("lora.rslora", None),
    "use_dora": ("method", {True: "dora", False: "lora"}),
    "max_seq_length": ("data.max_length", None),
    "max_seq_len": ("data.max_length", None),
    "sequence_len": ("data.max_length", None),  # Axolotl
    "cutoff_len": ("data.max_length", None),  # LLaMA-Factory
    "max_length": ("data.max_length", None),
    "model_name_or_path": ("model.name", None),
    "base_model": ("model.name", None),  # Axolotl
    "output_dir": ("output.path", None),
    "trust_remote_code": ("model.trust_remote_code", None),
    "gradient_checkpointing": ("training.gradient_checkpointing", None),
    "packing": ("training.packing", None),
    "sample_packing": ("training.packing", None),  # Axolotl
}
# inside a section: their key -> ours (`lora: {lora_r: 8}`, `training: {per_device_train_batch_size: 4}`)
SECTION_ALIASES: dict[str, dict[str, tuple[str, object]]] = {}
for _alias, (_target, _how) in ALIASES.items():
    if "." in _target:
        _section, _, _field = _target.partition(".")
        SECTION_ALIASES.setdefault(_section, {})[_alias] = (_field, _how)


def normalize(raw: dict, cls, notice=None) -> dict:
    """`raw` with aliases and flat keys moved to our names (a copy). `notice(text)` gets one line per alias
    used; conflicts raise one ConfigError listing each."""
    import dataclasses
    import typing

    if not isinstance(raw, dict):
        return raw
    notice = notice or (lambda text: None)
    hints = typing.get_type_hints(cls)
    sections = {f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}
    top_fields = {f.name for f in dataclasses.fields(cls)} - sections
    owners: dict[str, list[str]] = {}  # field name -> the sections that have it
    for s in sections:
        for f in dataclasses.fields(hints[s]):
            owners.setdefault(f.name, []).append(s)
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    moves, errors = [], []  # (their key as written, our dotted path, value)
    for key in list(out):
        if key in sections or key in top_fields:
            continue
        if key in ALIASES:
            path, convert = ALIASES[key]
            moves.append((key, path, _convert(key, out.pop(key), convert, errors)))
        elif len(owners.get(key, [])) == 1:
            moves.append((key, f"{owners[key][0]}.{key}", out.pop(key)))
        elif len(owners.get(key, [])) > 1:
            errors.append(
                f"'{key}' at the top level could be {' or '.join(f'{s}.{key}' for s in owners[key])}: "
                "put it in its section"
            )
    for section, aliases in SECTION_ALIASES.items():
        block = out.get(section)
        if not isinstance(block, dict):
            continue
        for key in list(block):
            if key in aliases and key not in {f.name for f in dataclasses.fields(hints[section])}:
                sub, convert = aliases[key]
                moves.append((f"{section}.{key}", f"{section}.{sub}", _convert(key, block.pop(key), convert, errors)))
    for theirs, path, value in moves:
        section, _, name = path.rpartition(".")
        target = out.setdefault(section, {}) if section else out
        if not isinstance(target, dict):
            continue  # the loader reports the section itself
        if name in target and target[name] != value:
            errors.append(f"'{theirs}' ({value!r}) and '{path}' ({target[name]!r}) are both given and differ: keep one")
            continue
        target[name] = value
        if theirs.split(".")[-1] != name or "." not in theirs:
            notice(f"note: '{theirs}' is ayar's '{path}'")
    if errors:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {e}" for e in errors))
    return out


def _convert(key: str, value, convert, errors: list[str]):
    if convert is None:
        return value
    if convert == "tracker":  # report_to: a name or a list of names; "none" / [] means none
        if not isinstance(value, (str, list)) and value is not None:
            errors.append(f"{key}: {value!r}: give a tracker name or a list of them")
            return value
        names = [value] if isinstance(value, str) else list(value or [])
        names = [n for n in names if n not in ("none", "all")] or ["none"]
        return names[0] if len(names) == 1 else names
    if convert == "targets":  # LLaMA-Factory's lora_target: "all" or "q_proj,v_proj"
        if value == "all":
            return "all-linear"
        return [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else value
    if isinstance(convert, dict):
        known = isinstance(value, (str, int, float, bool)) and value in convert
        if not known:
            errors.append(f"{key}: {value!r} has no ayar equivalent here; choose one of {', '.join(map(str, convert))}")
            return value
        return convert[value]
    return value
