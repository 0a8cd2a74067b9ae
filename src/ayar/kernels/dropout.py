"""Dropout for the inputs of LoRA adapters on CPU, with no mask drawn from torch's generator or kept.

torch's CPU dropout draws one number per element from its Mersenne Twister and keeps a mask for backward:
on a 135M model with LoRA on all linear layers that was ~20 % of a training step (benchmarks/README.md).
Here an element's keep/drop is a hash of its index and a 32-bit seed, and the seed is what is drawn from
torch's generator (so seeded runs repeat and resumed RNG state holds). The hash and the `where` run as
one compiled loop, several masks of one input in one pass (q, k and v of 871 tokens: 0.65 ms, where
drawing and applying three masks took 5.2 ms on a 2-core CPU); backward recomputes the masks from the
saved seeds, so no mask is kept. Meaning kept: each element is zeroed with probability p (to 1/65536),
independently of its neighbours and of other masks (tests/unit/test_fused.py), the rest scaled by 1/(1-p).
"""

from __future__ import annotations

import torch
from torch import nn

from ayar.kernels.compiled import pointwise

# murmur3's 32-bit finalizer over golden-ratio-spaced indices, as signed int32 constants (int32 math wraps)
_GOLDEN, _M1, _M2 = 0x9E3779B9 - 2**32, 0x85EBCA6B - 2**32, 0xC2B2AE35 - 2**32
_MAX_ELEMENTS = 2**31  # element indices are int32


def _hash(i: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    h = i * _GOLDEN + seed  # another seed: the same stream from a far-off index
    h = (((h >> 16) & 0xFFFF) ^ h) * _M1  # `>> k & mask`: the logical shift on a signed int
    h = (((h >> 13) & 0x7FFFF) ^ h) * _M2
    return ((h >> 16) & 0xFFFF) ^ h


def _keeps(like: torch.Tensor, seeds: torch.Tensor, thresholds: torch.Tensor) -> list[torch.Tensor]:
    i = torch.arange(like.numel(), device=like.device, dtype=torch.int32).view(like.shape)
    return [(_hash(i, seeds[j]) & 0xFFFF) >= thresholds[j] for j in range(len(seeds))]


# probabilities and scales go in as tensors: one compiled kernel serves any values (as Python numbers,
# each new value would compile again, up to torch's recompile limit)
def _thresholds(ps, device) -> torch.Tensor:
    # the hash's low 16 bits are uniform: drop below this
    return torch.tensor([round(p * 65536) for p in ps], dtype=torch.int32, device=device)


def draw_seeds(n: int, device) -> torch.Tensor:
    """n int32 seeds from torch's generator: all n dropout masks need to be drawn again."""
    return torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, device=device)


def _dropped(keeps, x):
    return tuple(torch.where(keep, x, 0.0) for keep in keeps)


@pointwise
def _dropped_each(x, seeds, thresholds):
    return _dropped(_keeps(x, seeds, thresholds), x)


def _sum_masked(keeps, parts, scales):
    out = None
    for j, (keep, part) in enumerate(zip(keeps, parts)):
        term = torch.where(keep, part * scales[j].to(part.dtype), 0.0)
        out = term if out is None else out + term
    return out


@pointwise
def _masked_sum(parts, seeds, thresholds, scales):
    return _sum_masked(_keeps(parts[0], seeds, thresholds), parts, scales)


@pointwise
def _dropped_each_and_masked_sum(x, parts, seeds, thresholds, scales):
    keeps = _keeps(x, seeds, thresholds)
    return _dropped(keeps, x), _sum_masked(keeps, parts, scales)


def _check(x: torch.Tensor) -> None:
    if x.numel() > _MAX_ELEMENTS:
        raise ValueError(f"dropout on a tensor of {x.numel():,} elements: at most 2^31 (use smaller batches)")


def keep_masks(x: torch.Tensor, seeds: torch.Tensor, ps) -> list[torch.Tensor]:
    """The bool keep masks the seeds stand for on a tensor shaped like x (for tests and references)."""
    return _keeps(x, seeds, _thresholds(ps, x.device))


def dropped_each(x: torch.Tensor, seeds: torch.Tensor, ps) -> tuple[torch.Tensor, ...]:
    """x with mask j applied (dropped elements 0, the rest unscaled), for each seed j and probability
    ps[j]: one pass over x for all of them."""
    _check(x)
    # as 2-D (the same element order, so the same masks): one compiled kernel serves any rank
    return tuple(y.view(x.shape) for y in _dropped_each(_as_2d(x), seeds, _thresholds(ps, x.device)))


def masked_sum(parts, seeds: torch.Tensor, ps, scales) -> torch.Tensor:
    """sum_j scales[j] * parts[j] with mask j applied (parts shaped alike): one pass."""
    _check(parts[0])
    device = parts[0].device
    out = _masked_sum(
        [_as_2d(p) for p in parts],
        seeds,
        _thresholds(ps, device),
        torch.tensor(scales, dtype=torch.float32, device=device),
    )
    return out.view(parts[0].shape)


def dropped_each_and_masked_sum(x: torch.Tensor, parts, seeds: torch.Tensor, ps, scales):
    """`dropped_each(x, seeds, ps)` and `masked_sum(parts, seeds, ps, scales)` (parts shaped like x) from one
    pass that hashes each mask once (what a LoRA group's backward needs)."""
    _check(x)
    device = x.device
    xs, out = _dropped_each_and_masked_sum(
        _as_2d(x),
        [_as_2d(p) for p in parts],
        seeds,
        _thresholds(ps, device),
        torch.tensor(scales, dtype=torch.float32, device=device),
    )
    return tuple(y.view(x.shape) for y in xs), out.view(x.shape)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


class _HashDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        seeds = draw_seeds(1, x.device)
        ctx.p = p
        ctx.save_for_backward(seeds)
        return masked_sum([x], seeds, [p], [1.0 / (1.0 - p)])

    @staticmethod
    def backward(ctx, g):
        (seeds,) = ctx.saved_tensors
        return masked_sum([g.contiguous()], seeds, [ctx.p], [1.0 / (1.0 - ctx.p)]), None


class FastDropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if not torch.is_grad_enabled():  # nothing kept for a backward: torch's is quicker on a few rows (GRPO samples
            return nn.functional.dropout(x, self.p, True)  # its answers in training mode, a token at a time)
        return _HashDropout.apply(x, self.p)


def use_fast_dropout(model) -> int:
    """Swap peft's LoRA dropout modules for FastDropout (CPU only: on GPUs torch's fused dropout is
    already cheap). Returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, d in list(dropouts.items()):
            if type(d) is nn.Dropout and d.p > 0:
                dropouts[name] = FastDropout(d.p)
                swapped += 1
    return swapped
