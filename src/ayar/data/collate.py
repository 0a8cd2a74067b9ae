"""Examples -> tensors. Padded batches, or one padding-free packed row with per-example position_ids
and the segment boundaries (`cu_seq_lens`: each example's start, then the row's length).

A packed row may also share its examples' common opening once (`share_prefix`; the fused decoder
attends each example to it, fused_decoder.py): examples that start alike (a chat template's default
system prompt, a fixed instruction) compute those tokens once per row instead of once per example.
That is exact as long as no shared position is trained, which `shared_prefix_length` ensures."""

from __future__ import annotations

import torch

from ayar.data.render import IGNORE, Example

MIN_SHARED_PREFIX = 8  # below this, sharing saves less than it costs


def collate(examples: list[Example], pad_id: int, packing: bool = False, share_prefix: bool = False) -> dict:
    if packing:
        n = shared_prefix_length(examples) if share_prefix else 0
        return _packed(examples) if n < MIN_SHARED_PREFIX else _packed_shared(examples, n)
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


def shared_prefix_length(examples: list[Example]) -> int:
    """How many opening tokens the examples can share: common to all, each leaving a token of its own, and
    none of them trained nor the one after (a shared position's prediction must not be a target)."""
    if len(examples) < 2:
        return 0
    first, n = examples[0].input_ids, min(len(e.input_ids) for e in examples) - 1
    # only the first n + 1 labels and ids can lower n; whole slices compared first (the planner asks this of a dataset)
    for e in examples:
        head = list(e.labels[: n + 1])
        if head.count(IGNORE) != len(head):
            n = min(n, next(i for i, label in enumerate(head) if label != IGNORE) - 1)
        if n <= 0:
            return 0
        ids = e.input_ids
        if list(ids[:n]) != list(first[:n]):
            n = next(k for k in range(n) if ids[k] != first[k])
    return n


def _packed_shared(examples: list[Example], n: int) -> dict:
    """[common opening][rest of example 1][rest of example 2]...: segment 0 is the opening, each later
    segment attends to it and to itself (`shared_prefix`), positions continuing from the opening's."""
    ids, labels, pos = list(examples[0].input_ids[:n]), [IGNORE] * n, list(range(n))
    starts = [0]
    for e in examples:
        starts.append(len(ids))
        ids += e.input_ids[n:]
        labels += [IGNORE] + e.labels[n + 1 :]  # labels[n] is untrained (shared_prefix_length)
        pos += list(range(n, len(e.input_ids)))
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([pos]),
        "labels": torch.tensor([labels]),
        "cu_seq_lens": torch.tensor(starts + [len(ids)]),
        "shared_prefix": torch.tensor(n),
        "example_tokens": torch.tensor(sum(len(e.input_ids) for e in examples)),
    }
