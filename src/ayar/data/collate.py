"""Examples -> tensors. Padded batches, or one padding-free packed row with per-example position_ids
and the segment boundaries (`cu_seq_lens`: each example's start, then the row's length)."""

from __future__ import annotations

import torch

from ayar.data.render import IGNORE, Example


def collate(examples: list[Example], pad_id: int, packing: bool = False) -> dict:
    if packing:
        return _packed(examples)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _packed(examples: list[Example]) -> dict:
    # transformers builds a block-diagonal causal mask from position_ids that restart at 0 (no
    # attention_mask given), so no token attends across an example boundary.
    ids, labels, pos, starts = [], [], [], []
    for e in examples:
        starts.append(len(ids))
        ids += e.input_ids
        # The first token of an example is never a target: it must not be predicted from the previous example.
        labels += [IGNORE] + e.labels[1:]
        pos += list(range(len(e.input_ids)))
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([pos]),
        "labels": torch.tensor([labels]),
        "cu_seq_lens": torch.tensor(starts + [len(ids)]),
    }
