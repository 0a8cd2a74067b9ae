"""Padding-free training passes on CPU: several examples in one row, attention computed per example.

A pass's linear layers then see only real tokens (no padding), and attention costs the sum of each
example's len^2 instead of the whole row's (packing with transformers' block-diagonal mask computes
attention over the whole row, and on CPU that was slower than padding: benchmarks/README.md).

It is an attention function registered with transformers ("ayar_varlen"), used only inside
`varlen_attention(model)` and only for model types whose attention is plain causal softmax attention
(no sliding window, soft-capping or sinks), so nothing is approximated. Segment boundaries arrive as
`cu_seq_lens_q`, the keyword transformers passes through to attention functions for packed rows.
Per segment, short ones use matmul + fp32 softmax (2x faster than torch's CPU flash kernel at a few
hundred tokens, measured), longer ones torch's SDPA, which never holds len x len for every layer.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

NAME = "ayar_varlen"
# Segments up to this length use matmul attention: faster than the CPU flash kernel up to ~400 tokens
# (2.3 vs 4.7 ms at 232, 5.8 vs 9.4 at 350, even at 500; forward + backward, 9 heads), at the cost of
# keeping heads x len^2 probabilities per layer for backward (counted by the memory planner).
MATMUL_MAX_LEN = 384
# Attention here is exactly causal softmax(QK^T * scale)V: model types whose attention adds nothing else.
PLAIN_ATTENTION = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "granite", "smollm3"}

_registered = False
_masks: dict[tuple, torch.Tensor] = {}


def supported(config, device: str) -> bool:
    """Whether training passes for this model can be padding-free with per-example attention."""
    if device != "cpu":  # on GPUs, flash-attention kernels already take packed rows (attn_implementation)
        return False
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(c, "model_type", None) not in PLAIN_ATTENTION:
        return False
    if getattr(c, "use_sliding_window", False) and getattr(c, "sliding_window", None):
        return False
    if c.model_type == "mistral" and getattr(c, "sliding_window", None):
        return False
    return not getattr(c, "attn_logit_softcapping", None)


def routes(config, batch: dict) -> bool:
    """Whether this batch's attention goes per example: a packed row (`cu_seq_lens`) of a supported model."""
    return "cu_seq_lens" in batch and supported(config, batch["input_ids"].device.type)


@contextlib.contextmanager
def varlen_attention(model):
    """Route the model's attention through the per-segment function for the duration of a pass."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, _attention)
        _registered = True
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous


def _attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, cu_seq_lens_q=None, **kwargs
):
    """query [1, heads, T, d], key/value [1, kv_heads, T, d] of one packed row; cu_seq_lens_q: segment starts + T."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    bounds = cu_seq_lens_q.tolist() if torch.is_tensor(cu_seq_lens_q) else list(cu_seq_lens_q)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    outs = [
        segment_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], scale)
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def segment_attention(q, k, v, scale: float) -> torch.Tensor:
    """Causal attention over one example: q [1, H, L, d], k/v [1, G, L, d] (G divides H) -> [1, H, L, d]."""
    _, heads, length, dim = q.shape
    groups = heads // k.shape[1]
    if length > MATMUL_MAX_LEN:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=groups > 1)
    # The query heads sharing a key/value head are stacked along the rows: no repeated K/V copies.
    scores = torch.matmul(q.reshape(1, k.shape[1], groups * length, dim), k.transpose(2, 3)) * scale
    probs = F.softmax(scores.masked_fill(_future(length, groups, q.device), float("-inf")), dim=-1, dtype=torch.float32)
    return torch.matmul(probs.to(q.dtype), v).reshape(1, heads, length, dim)


def _future(length: int, groups: int, device) -> torch.Tensor:
    key = (length, groups, str(device))
    if key not in _masks:
        if len(_masks) > 512:
            _masks.clear()
        _masks[key] = torch.ones(length, length, dtype=torch.bool, device=device).triu(1).repeat(groups, 1)
    return _masks[key]
