"""Markdown reference of a config dataclass, generated from its fields (the README embeds this output)."""

from __future__ import annotations

import dataclasses
import typing

from ayar.config.loader import _type_name


def config_reference(cls: type | None = None) -> str:
    """The training config's reference (with the `hpo:` section `ayar hpo` reads), or one class's."""
    if cls is None:
        from ayar.config.schema import HpoConfig, TrainConfig

        doc = " ".join(HpoConfig.__doc__.split())  # one line in the table, however the docstring is wrapped
        hpo = [f"**`hpo:`** {doc}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(HpoConfig)
        hpo += [_row(f, hints[f.name], "hpo.") for f in dataclasses.fields(HpoConfig)]
        from ayar.config.schema import RlaifConfig

        rlaif = " ".join(RlaifConfig.__doc__.split())
        return (
            config_reference(TrainConfig)
            + "\n"
            + "\n".join(hpo)
            + f"\n\n### `ayar rlaif` configs\n\n{rlaif}\n\n"
            + config_reference(RlaifConfig)
        )
    hints = typing.get_type_hints(cls)
    top = [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]
    lines = []
    if top:
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [_row(f, hints[f.name], "") for f in top]
        lines.append("")
    for f in dataclasses.fields(cls):
        sub = hints[f.name]
        if not dataclasses.is_dataclass(sub):
            continue
        lines += [
            f"**`{f.name}:`** {f.metadata.get('help', '')}",
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        sub_hints = typing.get_type_hints(sub)
        lines += [_row(g, sub_hints[g.name], f"{f.name}.") for g in dataclasses.fields(sub)]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _row(f: dataclasses.Field, typ, prefix: str) -> str:
    if f.default is not dataclasses.MISSING:
        default = f.default
    else:
        default = f.default_factory()
    default_s = (
        "null"
        if default is None
        else repr(default)
        if isinstance(default, str)
        else str(default).lower()
        if isinstance(default, bool)
        else str(default)
    )
    help_ = f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    if choices:
        help_ += " One of: " + ", ".join(f"`{c}`" for c in choices) + "."
    return f"| `{prefix}{f.name}` | {_type_name(typ)} | `{default_s}` | {help_.replace('|', '/')} |"


def alias_reference() -> str:
    """The alias table (config/aliases.py) as Markdown: docs/config-aliases.md embeds this output."""
    from ayar.config.aliases import ALIASES

    rows = ["| their name | ayar's | value |", "|---|---|---|"]
    for theirs, (ours, convert) in sorted(ALIASES.items()):
        how = {
            None: "as is",
            "tracker": "a name or a list of names (several trackers at once)",
            "targets": '"all" -> all-linear, or "a,b" -> [a, b]',
        }
        value = ", ".join(f"{k} -> {v}" for k, v in convert.items()) if isinstance(convert, dict) else how[convert]
        rows.append(f"| `{theirs}` | `{ours}` | {value} |")
    return "\n".join(rows) + "\n"
