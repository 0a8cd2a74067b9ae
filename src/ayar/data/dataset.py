"""Load, render and split the training data described by a DataConfig."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ayar.data.formats import to_conversations
from ayar.data.render import Example, Renderer
from ayar.data.sources import read_rows
from ayar.errors import DataError


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    stats: dict = field(default_factory=dict)


def load_conversations(spec: str, fmt: str = "auto", max_rows: int | None = None):
    rows = read_rows(spec)
    if max_rows:
        rows = rows[:max_rows]
    return to_conversations(rows, fmt)


def prepare_data(data_cfg, tokenizer, seed: int = 42) -> PreparedData:
    renderer = Renderer(tokenizer, data_cfg.template, data_cfg.max_length, data_cfg.train_on_prompt, data_cfg.system_prompt)
    convs = load_conversations(data_cfg.train, data_cfg.format, data_cfg.max_rows)
    if data_cfg.validation:
        val_convs = load_conversations(data_cfg.validation, data_cfg.format)
    else:
        convs, val_convs = split_by_ratio(convs, data_cfg.val_ratio, seed)
    if not convs:
        raise DataError(f"{data_cfg.train}: no training rows left after holding out validation rows; lower data.val_ratio")
    train = [renderer.render(c) for c in convs]
    val = [renderer.render(c) for c in val_convs]
    stats = {
        "train_rows": len(train),
        "val_rows": len(val),
        "train_tokens": sum(len(e.input_ids) for e in train),
        "trained_tokens": sum(e.n_trained for e in train),
        "truncated_rows": sum(e.truncated for e in train + val),
        "max_length": data_cfg.max_length,
    }
    return PreparedData(train, val, stats)


def split_by_ratio(items: list, ratio: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then hold out round(n * ratio) items (at least one when ratio > 0 and n > 1)."""
    if ratio <= 0 or len(items) < 2:
        return list(items), []
    if ratio >= 1:
        raise DataError(f"data.val_ratio must be below 1, got {ratio}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = min(len(items) - 1, max(1, round(len(items) * ratio)))
    val_idx = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]
