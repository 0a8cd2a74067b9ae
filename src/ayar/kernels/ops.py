"""Autograd functions for the fused LoRA training path (fused_decoder.py), in plain torch ops.

Each one computes exactly what the module it replaces computes (HF's RMSNorm, rotary embedding and
SwiGLU MLP, peft's LoRA linear), with a hand-written backward that saves and recomputes less. What they
save over the module-by-module path, measured on a 2-core CPU (benchmarks/README.md):
- LoRA: projections that read the same input (q/k/v, gate/up) share one base matmul, forward and
  backward, and adapters are added into the output by `addmm_` (no separate scale, add or copy passes);
  in backward the base matmul accumulates onto the adapters' input gradient, and one pass redraws the
  dropout masks for both the A gradients and the input gradient;
- RMSNorm, RoPE (with v split off in the same pass) and SwiGLU: one node each instead of 5-10 autograd
  nodes, no gradient computed for frozen weights, and their elementwise math compiled by torch.compile
  into one loop per direction (`pointwise`: ~10 s once per machine, cached by torch; eager torch ops
  where compiling fails).
Base weights are frozen here (gradients only for the input and the LoRA A/B matrices).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ayar.kernels.compiled import pointwise
from ayar.kernels.dropout import dropped_each, dropped_each_and_masked_sum


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter of a projection group: output columns [start, stop), scale, dropout p."""

    start: int
    stop: int
    scale: float
    dropout: float


class LoraLinear(torch.autograd.Function):
    """y = x W^T + b + sum_i s_i * dropout_i(x) A_i^T B_i^T, adapter i writing columns [start_i, stop_i);
    dropout_i(x) = x * keep_i / (1 - p_i), keep_i the mask of seeds[i] (kernels/dropout.py; seeds None: no
    dropout). Masks are not kept: backward draws them again from the seeds.

    W [N, K] is the frozen base weight of a projection group (e.g. q, k and v stacked), so the group
    costs one base matmul each way. A_i [r, K] and B_i [n_i, r] may be fp32 masters over a bf16 base:
    they are cast to x's dtype for the matmuls and their gradients returned in their own dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, adapters: tuple[Adapter, ...], seeds: torch.Tensor | None, *ab):
        a_w = [t.to(x.dtype) for t in ab[0::2]]
        b_w = [t.to(x.dtype) for t in ab[1::2]]
        y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        shared = seeds is None
        if shared:
            # no dropout: every adapter reads x itself, so their A matrices run as one matmul
            h_all = x @ torch.cat(a_w).t()
            hs = list(h_all.split([a.shape[0] for a in a_w], dim=1))
        else:
            xs = dropped_each(x, seeds, [ad.dropout for ad in adapters])
            hs = [xi @ a.t() for xi, a in zip(xs, a_w)]
        # h is taken without dropout's 1/(1-p): it is part of each adapter's effective scale
        scales = tuple(ad.scale if shared else ad.scale / (1.0 - ad.dropout) for ad in adapters)
        for ad, sc, h, b in zip(adapters, scales, hs, b_w):
            y[:, ad.start : ad.stop].addmm_(h, b.t(), alpha=sc)
        ctx.adapters, ctx.shared, ctx.scales = adapters, shared, scales
        ctx.ab_dtypes = [t.dtype for t in ab]
        ctx.save_for_backward(x, weight, x.new_empty(0) if shared else seeds, *hs, *ab)  # tensors only
        return y

    @staticmethod
    def backward(ctx, g):
        n = len(ctx.adapters)
        x, weight, seeds, *rest = ctx.saved_tensors
        hs, ab = rest[:n], rest[n:]
        a_w = [t.to(x.dtype) for t in ab[0::2]]
        b_w = [t.to(x.dtype) for t in ab[1::2]]
        g = g.contiguous()
        grad_x = None
        gh = [g[:, ad.start : ad.stop] @ b for ad, b in zip(ctx.adapters, b_w)]  # [T, r] each
        grads_ab = []
        if ctx.shared:
            gh_all = torch.cat([h * sc for h, sc in zip(gh, ctx.scales)], dim=1)
            if ctx.needs_input_grad[0]:
                grad_x = (g @ weight).addmm_(gh_all, torch.cat(a_w))
            grad_a = (gh_all.t() @ x).split([a.shape[0] for a in a_w], dim=0)
        else:
            ps = [ad.dropout for ad in ctx.adapters]
            if ctx.needs_input_grad[0]:
                xs, masked = dropped_each_and_masked_sum(x, [ghi @ a for ghi, a in zip(gh, a_w)], seeds, ps, ctx.scales)
                grad_x = masked.addmm_(g, weight)  # the base matmul accumulates onto the adapters' part
            else:
                xs = dropped_each(x, seeds, ps)
            grad_a = [sc * (ghi.t() @ xi) for sc, ghi, xi in zip(ctx.scales, gh, xs)]
        for ad, sc, ga, h in zip(ctx.adapters, ctx.scales, grad_a, hs):
            grads_ab += [ga, sc * (g[:, ad.start : ad.stop].t() @ h)]
        grads_ab = [gr.to(dt) for gr, dt in zip(grads_ab, ctx.ab_dtypes)]
        return (grad_x, None, None, None, None, *grads_ab)


def lora_linear(x, weight, bias, adapters, seeds, ab):
    return LoraLinear.apply(x, weight, bias, tuple(adapters), seeds, *ab)


# --- elementwise math, compiled ------------------------------------------------------------------


@pointwise
def _rms_forward(x, weight, eps: float):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


@pointwise
def _rms_backward(g, x, weight, rstd):
    xhat = x.float() * rstd
    gw = (g * weight).float()
    return (rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))).to(x.dtype)


def _rotate(x, cos, sin):
    # HF: x * cos + rotate_half(x) * sin, rotate_half([a, b]) = [-b, a]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos[..., :half] - x2 * sin[..., :half], x2 * cos[..., half:] + x1 * sin[..., half:]], dim=-1)


def _rotate_back(g, cos, sin):
    # the transpose of rotate_half: [a, b] -> [b, -a]
    half = g.shape[-1] // 2
    g1, g2 = g[..., :half], g[..., half:]
    return torch.cat([g1 * cos[..., :half] + g2 * sin[..., half:], g2 * cos[..., half:] - g1 * sin[..., :half]], dim=-1)


@pointwise
def _rope_split_forward(qk, v, cos, sin):
    return _rotate(qk, cos, sin), v.clone(memory_format=torch.contiguous_format)


@pointwise
def _rope_split_backward(g_qk, g_v, cos, sin):
    T = g_qk.shape[0]
    return torch.cat([_rotate_back(g_qk, cos, sin).reshape(T, -1), g_v.reshape(T, -1)], dim=1)


@pointwise
def _swiglu_forward(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pointwise
def _swiglu_backward(g, gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    # d silu / d gate = sig * (1 + gate * (1 - sig)) = sig + silu * (1 - sig)
    return torch.cat([g * up * (sig + silu * (1 - sig)), g * silu], dim=-1)


# --- autograd nodes ------------------------------------------------------------------------------


class RMSNorm(torch.autograd.Function):
    """HF's RMSNorm (statistics in fp32, then weight * normalized in the input dtype), frozen weight."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, rstd = _rms_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        return _rms_backward(g, x, weight, rstd), None, None


def rms_norm(x, weight, eps: float):
    return RMSNorm.apply(x, weight, eps)


class RopeSplit(torch.autograd.Function):
    """A q/k/v projection's output [T, (H + 2G) * d] as rotated q/k heads [T, H + G, d] and a copy of v
    [T, G, d], in one pass each way: the gradient comes back as one [T, (H + 2G) * d] tensor (slicing
    q/k and v off would zero-fill and add two such tensors in backward)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, rotated: int):
        ctx.save_for_backward(cos, sin)
        T, d = qkv.shape[0], cos.shape[-1]
        return _rope_split_forward(
            qkv[:, : rotated * d].view(T, rotated, d), qkv[:, rotated * d :].view(T, -1, d), cos, sin
        )

    @staticmethod
    def backward(ctx, g_qk, g_v):
        cos, sin = ctx.saved_tensors
        return _rope_split_backward(g_qk.contiguous(), g_v.contiguous(), cos, sin), None, None, None


def rope_split(qkv, cos, sin, rotated: int):
    """(rotated first `rotated` heads, copy of the rest) of qkv viewed as heads of cos's width."""
    return RopeSplit.apply(qkv, cos, sin, rotated)


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up from one [T, 2I] tensor holding gate then up (the fused gate/up projection)."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return _swiglu_forward(gate_up)

    @staticmethod
    def backward(ctx, g):
        (gate_up,) = ctx.saved_tensors
        return _swiglu_backward(g, gate_up)


def swiglu(gate_up):
    return SwiGLU.apply(gate_up)


CE_CHUNK = 256  # trained positions whose logits exist at once (the memory planner counts one chunk)
VOCAB_BLOCK = 1024  # on CPU, vocabulary rows of the head per step of the online softmax


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, t_i) over rows of h, a chunk of rows at a time: the [rows, vocab] fp32 logits are
    never held whole. W (the output head) is frozen; the gradient for h is computed in forward when h
    requires one, and only scaled in backward.

    On CPU a chunk goes through the vocabulary in blocks with an online softmax (as flash attention does
    over keys): each block's logits are made, exponentiated and multiplied into the gradient while they
    are in cache, the running max and sum rescaling what came before. Against whole-vocabulary logits per
    chunk (written to and read back from memory three times) the head ran 1.19x faster (2-core AVX2 CPU,
    benchmarks/README.md). On GPUs a chunk's logits are made at once (48 blocks would be 48 small kernels)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int):
        need_grad = h.requires_grad
        grad_h = torch.empty_like(h) if need_grad else None
        total = h.new_zeros((), dtype=torch.float32)
        one_chunk = _chunk_online if online_softmax(h.device.type) else _chunk_whole
        for a in range(0, h.shape[0], chunk):
            total += one_chunk(
                h[a : a + chunk], weight, targets[a : a + chunk], grad_h[a : a + chunk] if need_grad else None
            )
        ctx.save_for_backward(grad_h if need_grad else h.new_empty(0))
        return total

    @staticmethod
    def backward(ctx, g):
        (grad_h,) = ctx.saved_tensors
        return grad_h * g.to(grad_h.dtype), None, None, None


def online_softmax(device_type: str) -> bool:
    """Whether a chunk goes through the vocabulary in blocks (CPU) or makes its whole logits (GPUs): the
    memory planner counts the logits held by the same rule."""
    return device_type == "cpu"


def _chunk_whole(h, weight, t, grad_out):
    """Summed CE of one chunk from its whole [vocab, rows] logits; writes the gradient into grad_out (if given)."""
    # logits transposed, [vocab, rows]: W @ h^T ran at 85 GFLOP/s where h @ W^T ran at 60 (2-core AVX2 CPU)
    logits = (weight @ h.t()).float()
    cols = torch.arange(len(t), device=t.device)
    lse = torch.logsumexp(logits, dim=0)
    loss = (lse - logits[t, cols]).sum()
    if grad_out is not None:
        probs = logits.sub_(lse).exp_()  # softmax, in place
        probs[t, cols] -= 1
        torch.mm(probs.t().to(weight.dtype), weight, out=grad_out)
    return loss


def _chunk_online(h, weight, t, grad_out, block: int | None = None):
    """`_chunk_whole` a vocabulary block at a time: running max m and sum s of exp(logit - m) per row, and
    acc = sum_v exp(logit_v - m) W_v, all rescaled when m grows; softmax @ W is then acc / s."""
    block = block or VOCAB_BLOCK
    rows = h.shape[0]
    ht = h.t().contiguous()
    m = torch.full((rows,), -torch.inf, device=h.device)
    s = torch.zeros(rows, device=h.device)
    target_logit = torch.zeros(rows, device=h.device)
    acc = torch.zeros(rows, h.shape[1], device=h.device) if grad_out is not None else None
    buf = torch.empty(min(block, weight.shape[0]), rows, dtype=h.dtype, device=h.device)
    cols = torch.arange(rows, device=h.device)
    for a in range(0, weight.shape[0], block):
        w = weight[a : a + block]
        logits = buf[: w.shape[0]]
        torch.mm(w, ht, out=logits)  # [block, rows], written into a buffer that stays in cache
        logits = logits.float()
        here = (t >= a) & (t < a + w.shape[0])
        target_logit[here] = logits[t[here] - a, cols[here]]
        m_new = torch.maximum(m, logits.amax(dim=0))
        rescale = torch.exp(m - m_new)
        p = logits.sub_(m_new).exp_()
        s.mul_(rescale).add_(p.sum(dim=0))
        if acc is not None:
            acc.mul_(rescale[:, None])
            if acc.dtype == w.dtype:
                acc.addmm_(p.t(), w)
            else:  # low-precision head: multiply in its dtype, accumulate in fp32
                acc += (p.t().to(w.dtype) @ w).float()
        m = m_new
    if acc is not None:
        grad_out.copy_(acc.div_(s[:, None]).sub_(weight[t].float()))
    return (m + s.log() - target_logit).sum()


def linear_cross_entropy(h, weight, targets, chunk: int = CE_CHUNK):
    """Summed cross-entropy of the logits h @ weight^T against targets (rows of h: trained positions)."""
    return LinearCrossEntropy.apply(h, weight, targets, chunk)
