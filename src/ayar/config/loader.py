"""YAML + dotted overrides -> a validated config dataclass.

Every problem is collected and reported in one ConfigError: unknown keys (with a did-you-mean), values
of the wrong type, values outside a field's choices. Nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from ayar.errors import ConfigError

_MISSING = object()
# Names users bring from HF TrainingArguments / peft / other tools -> ours, for the did-you-mean.
_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lr": "learning_rate",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "max_length",
    "max_seq_len": "max_length",
    "lr_scheduler_type": "lr_scheduler",
    "optim": "optimizer",
    "model_name_or_path": "name",
}


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = None):
    """Read a YAML config (or start from defaults when `path` is None), apply `key.sub=value` overrides."""
    if cls is None:
        from ayar.config.schema import TrainConfig

        cls = TrainConfig
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    return from_dict(cls, raw, where=str(path) if path is not None else "defaults")


def read_yaml(path: str | Path) -> dict:
    """A config file's top-level mapping, or a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = safe_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (model:, data:, ...), got {type(raw).__name__}"
        )
    return raw


MAX_NODES = 100_000  # a config is a few hundred values; an alias bomb expands to billions


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (a repeated section would otherwise
    silently replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise ConfigError(
                        f"{self.where}:{key_node.start_mark.line + 1}: {key!r} is given twice in the same mapping "
                        f"(first on line {seen[key] + 1}); merge the two into one"
                    )
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def safe_yaml(text: str, where: str):
    """YAML text as Python values, or a ConfigError naming `where` and the line: invalid YAML, a key given
    twice, an alias that refers to itself, or aliases that would expand past MAX_NODES values (checked on
    the parsed graph, before anything is expanded)."""
    try:
        loader = _Loader(text)  # the reader already refuses some characters here
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    loader.where = where
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    finally:
        loader.dispose()


def _check_expansion(root, where: str) -> None:
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = (
            []
            if isinstance(node, yaml.ScalarNode)
            else ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else list(node.value))
        )
        if done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_NODES:
                raise ConfigError(
                    f"{where}:{node.start_mark.line + 1}: aliases here expand to more than {MAX_NODES:,} "
                    "values; write the values out instead"
                )
            continue
        if id(node) in open_nodes:
            raise ConfigError(f"{where}:{node.start_mark.line + 1}: an alias refers to the value that contains it")
        open_nodes.add(id(node))
        stack.append((node, True))
        for c in children:
            if id(c) in open_nodes:
                raise ConfigError(f"{where}:{c.start_mark.line + 1}: an alias refers to the value that contains it")
            if id(c) not in sizes:
                stack.append((c, False))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of `raw` with each `a.b=value` set; values are parsed as YAML scalars/lists."""
    raw = _deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. lora.r=32)")
        key, _, text = item.partition("=")
        try:
            value = safe_yaml(text, f"override {item!r}") if text.strip() else ""
        except ConfigError:
            value = text
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node[parts[-1]] = value
    return raw


def from_dict(cls: type, raw: dict, where: str = "config"):
    """Build and validate a config: field types, choices and bounds, then the rules across fields
    (config/validate.py). Every problem is reported at once."""
    from ayar.config.aliases import normalize
    from ayar.config.schema import TrainConfig
    from ayar.config.validate import cross_field_errors

    if cls is TrainConfig:  # the names other tools use, and flat keys (config/aliases.py)
        try:
            raw = normalize(raw, cls, notice=lambda text: sys.stderr.write(f"ayar: {text}\n"))
        except ConfigError as e:
            raise ConfigError(str(e).replace("invalid config:", f"invalid config ({where}):", 1)) from None
    errors: list[str] = []
    obj = _build(cls, raw, prefix="", errors=errors)
    if not errors:
        errors = cross_field_errors(obj)
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise ConfigError(f"invalid config ({where}):\n{lines}")
    return obj


def dotted(d: dict, prefix: str = "") -> dict:
    """A nested config dict as dotted keys: {"lora": {"r": 8}} -> {"lora.r": 8} (what overrides and trackers use)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _build(cls: type, raw: Any, prefix: str, errors: list[str]):
    section = prefix.rstrip(".") or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{section}: expected a mapping of fields, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            alias = _ALIASES.get(str(key))
            guess = [alias] if alias in fields else difflib.get_close_matches(str(key), fields, n=1, cutoff=0.5)
            hint = f"; did you mean {guess[0]!r}?" if guess else f"; known keys: {', '.join(fields)}"
            errors.append(f"unknown key '{prefix}{key}' in section '{section}'{hint}")
            continue
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, prefix=f"{prefix}{key}.", errors=errors)
            continue
        choices = fields[key].metadata.get("choices")
        if isinstance(value, bool) and choices:  # YAML 1.1 reads off/on/no/yes as booleans: `memory_check: off`
            value = next(
                (c for c in (("off", "no", "false") if not value else ("on", "yes", "true")) if c in choices), value
            )
        coerced = _coerce(value, typ)
        if coerced is _MISSING:
            errors.append(f"{prefix}{key}: expected {_type_name(typ)}, got {value!r} ({type(value).__name__})")
            continue
        wrong = [v for v in (coerced if isinstance(coerced, list) else [coerced]) if v not in (choices or [v])]
        if wrong:  # a list field with choices (training.tracker) checks each item
            guess = difflib.get_close_matches(str(wrong[0]), choices, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            errors.append(f"{prefix}{key}: {wrong[0]!r} is not one of {', '.join(choices)}{hint}")
            continue
        problem = _out_of_bounds(coerced, fields[key].metadata)
        if problem:
            errors.append(f"{prefix}{key}: {coerced!r} {problem}")
            continue
        kwargs[key] = coerced
    return cls(**kwargs)


def _out_of_bounds(value: Any, meta) -> str | None:
    """Why a number breaks its field's bounds (`ge`, `gt`, `lt`, `le` in the schema), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "is not a finite number"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    rules = (
        ("ge", lambda b: value >= b, ">="),
        ("gt", lambda b: value > b, ">"),
        ("lt", lambda b: value < b, "<"),
        ("le", lambda b: value <= b, "<="),
    )
    broken = [f"{sign} {meta[k]}" for k, ok, sign in rules if k in meta and not ok(meta[k])]
    if not broken:
        return None
    wanted = " and ".join(f"{sign} {meta[k]}" for k, _, sign in rules if k in meta)
    return f"is out of range: it must be {wanted}"


def _coerce(value: Any, typ: Any):
    """Return `value` as `typ`, or _MISSING when it cannot be read as one (no lossy conversions)."""
    origin = typing.get_origin(typ)
    if origin in (Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            out = _coerce(value, arg)
            if out is not _MISSING:
                return out
        return _MISSING
    if typ is bool:
        return value if isinstance(value, bool) else _MISSING
    if typ is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISSING
    if typ is float:
        if isinstance(value, bool):
            return _MISSING
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` as a string
            try:
                return float(value)
            except ValueError:
                return _MISSING
        return _MISSING
    if typ is str:
        return value if isinstance(value, str) else _MISSING
    if typ is dict or origin is dict:
        return dict(value) if isinstance(value, dict) else _MISSING
    if typ is list or origin is list:
        return list(value) if isinstance(value, (list, tuple)) else _MISSING
    return value


def _type_name(typ: Any) -> str:
    origin = typing.get_origin(typ)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(typ) if a is not type(None)]
        optional = type(None) in typing.get_args(typ)
        return " or ".join(names) + (" or null" if optional else "")
    return {
        bool: "true/false",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(typ, str(typ))


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d
