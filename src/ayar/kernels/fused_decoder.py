"""Fused LoRA training passes for Llama-family decoders on CPU (`training.fused`).

The decoder of a packed, padding-free row (several examples, attention per example: varlen.py) runs
here instead of through the transformers + peft modules, computing the same thing with fewer, larger
operations (ops.py): q/k/v and gate/up each share one base matmul, LoRA adds into the base output
in place, and norms, rotary embedding and SwiGLU are single autograd nodes. The model stays the
transformers + peft model: this reads its weights, and saving, eval and export are untouched.

The q/k/v (and gate/up) base weights are restacked once into one tensor each, and the modules'
weights become views of it, so no second copy stays referenced. Weights loaded in their stored dtype are the
file's mapped pages, which stay resident: the memory planner counts the stacks then ("fused weight stacks");
weights converted as they loaded are freed as the stacks replace them.

Applies where every piece is known: model types whose layers are exactly Llama's (RMSNorm, rotary
attention without sliding windows or soft-capping, SwiGLU MLP), frozen base weights and norms, plain
LoRA adapters (not DoRA, not 4-bit), and CPU. Anything else keeps the module path (`reason()` says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ayar.kernels import base_model, varlen
from ayar.kernels.dropout import draw_seeds
from ayar.kernels.ops import Adapter, lora_linear, rms_norm, rope_split, swiglu

FAMILIES = {"llama", "mistral", "qwen2"}
_PLAN = "_ayar_fused_plan"


@dataclass
class Group:
    """Projections reading one input, as one frozen weight [N, K] and the adapters on its columns."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    adapters: tuple[Adapter, ...]
    ab: tuple[torch.Tensor, ...]  # A_0, B_0, A_1, B_1, ... (peft's parameters themselves)

    def __call__(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        if not self.adapters:
            return F.linear(x, self.weight, self.bias)
        dropout = training and any(ad.dropout > 0 for ad in self.adapters)
        seeds = draw_seeds(len(self.adapters), x.device) if dropout else None
        return lora_linear(x, self.weight, self.bias, self.adapters, seeds, self.ab)


@dataclass
class LayerPlan:
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv: Group
    o: Group
    gate_up: Group
    down: Group


@dataclass
class Plan:
    layers: list[LayerPlan]
    norm: torch.Tensor
    norm_eps: float
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    restacked: list  # (projections, stacked weight): the plan is stale once their weights no longer view it

    def valid(self) -> bool:
        return all(_linear(ms[0]).weight.data_ptr() == w.data_ptr() for ms, w in self.restacked)


def config_reason(config, device: str, method: str = "lora") -> str | None:
    """Why a model of this config, trained with `method` on `device`, cannot take the fused path (None: it
    can, if its modules are the expected ones: `reason` checks those on the model itself)."""
    if device != "cpu":
        return "CPU only (on GPUs, flash-attention kernels already take packed rows)"
    if method != "lora":
        return f"method {method} (fused: lora)"
    if getattr(config, "model_type", None) not in FAMILIES:
        return f"model type {getattr(config, 'model_type', None)!r} (fused: {', '.join(sorted(FAMILIES))})"
    if not varlen.supported(config, device):
        return "sliding-window or soft-capped attention"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "attention_dropout", 0.0):
        return "activation other than SiLU, or attention dropout"
    return None


def reason(model, device: str) -> str | None:
    """Why the fused path cannot run this model (None: it can)."""
    base = base_model(model)
    why = config_reason(base.config, device)
    if why is not None:
        return why
    if any(p.requires_grad for n, p in base.named_parameters() if "lora_" not in n):
        return "trainable weights besides LoRA adapters (full fine-tuning or modules_to_save)"
    try:
        _build(base)
    except _Unsupported as e:
        return str(e)
    return None


def usable(model, device: str) -> bool:
    base = base_model(model)
    plan = getattr(base, _PLAN, None)
    if plan is not None and plan.valid():
        return True
    if reason(model, device) is not None:
        return False
    setattr(base, _PLAN, _build(base, restack=True))
    return True


def release(model) -> None:
    """Give each restacked module its own weight again (after training): a model whose weights share one
    tensor could not be saved whole (safetensors refuses shared storage) after, say, a merge."""
    base = base_model(model)
    plan = getattr(base, _PLAN, None)
    if plan is None:
        return
    delattr(base, _PLAN)
    for modules, _ in plan.restacked:
        for m in modules:
            for p in (_linear(m).weight, _linear(m).bias):
                if p is not None:
                    p.data = p.data.clone()


def hidden_states(
    model, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seq_lens: torch.Tensor, shared_prefix: int = 0
) -> torch.Tensor:
    """The decoder's last hidden states [1, T, hidden] for one packed row; with `shared_prefix` n, its first
    segment is an opening of n tokens that every later segment attends to (collate.py)."""
    base = base_model(model)
    if not usable(model, input_ids.device.type):
        raise RuntimeError(f"the fused decoder cannot run this model: {reason(model, input_ids.device.type)}")
    plan: Plan = getattr(base, _PLAN)
    inner = base.get_decoder()
    training = base.training
    with torch.autocast(input_ids.device.type, enabled=False):
        x = inner.embed_tokens(input_ids)[0]
        cos, sin = inner.rotary_emb(x[None], position_ids)
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, head_dim]
        bounds = [int(b) for b in cu_seq_lens.tolist()]
        # the layers' gradient-checkpointing flag (loop.enable_checkpointing) applies here too
        checkpointing = torch.is_grad_enabled() and getattr(inner.layers[0], "gradient_checkpointing", False)
        for lp in plan.layers:
            if checkpointing:
                x = checkpoint(_layer, x, lp, plan, cos, sin, bounds, training, shared_prefix, use_reentrant=False)
            else:
                x = _layer(x, lp, plan, cos, sin, bounds, training, shared_prefix)
        x = rms_norm(x, plan.norm, plan.norm_eps)
    return x[None]


def _layer(x, lp: LayerPlan, plan: Plan, cos, sin, bounds, training: bool, prefix: int = 0):
    H, G = plan.heads, plan.kv_heads
    qkv = lp.qkv(rms_norm(x, lp.in_norm, lp.eps), training)
    qk, v = rope_split(qkv, cos, sin, H + G)  # q and k heads rotated together; v its own copy (qkv need not be kept)
    if any(b - a > varlen.MATMUL_MAX_LEN for a, b in zip(bounds[:-1], bounds[1:])):
        attn = attention(qk[:, :H], qk[:, H:], v, bounds, plan.scaling, prefix)
    else:
        attn = PackedAttention.apply(qk, v, H, tuple(bounds), plan.scaling, prefix)
    x = x + lp.o(attn, training)
    x = x + lp.down(swiglu(lp.gate_up(rms_norm(x, lp.post_norm, lp.eps), training)), training)
    return x


def _segments(bounds, prefix: int) -> list[tuple[int, int, int]]:
    """(a, b, p) per non-empty segment: its rows [a, b), and p, the prefix keys [0, p) it sees first."""
    return [(a, b, prefix if a > 0 else 0) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _stacked(x, kv_heads: int) -> torch.Tensor:
    """Query heads [L, H, d] as [G, H/G * L, d]: the heads sharing a key/value head stacked along the rows
    (one matmul per key head, no repeated K/V copies)."""
    L, H, d = x.shape
    return x.reshape(L, kv_heads, H // kv_heads, d).permute(1, 2, 0, 3).reshape(kv_heads, H // kv_heads * L, d)


def _unstack_into(dst, o) -> None:
    """Write o [G, H/G * L, d] (stacked as `_stacked` does) into dst [L, H, d] (a view)."""
    L, H, d = dst.shape
    G = o.shape[0]
    dst.unflatten(1, (G, H // G)).copy_(o.view(G, H // G, L, d).permute(2, 0, 1, 3))


def _with_prefix(k, a: int, b: int, p: int) -> torch.Tensor:
    return torch.cat([k[:p], k[a:b]]) if p else k[a:b]


# Queries of a segment go through attention in blocks of about this many rows: a block's scores need only
# the keys up to its last query, which skips most of the causal mask's wasted half (measured: benchmarks/README.md).
QUERY_BLOCK = 128


def query_blocks(length: int) -> list[tuple[int, int]]:
    """A segment's query rows [a, b) per block; the block sees keys up to b (and the prefix)."""
    n = max(1, round(length / QUERY_BLOCK))
    cuts = [length * i // n for i in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


class PackedAttention(torch.autograd.Function):
    """`attention` for rows whose segments are all short (matmul attention), as one autograd node: q/k
    come as the rotated [T, H + G, d] heads, v as [T, G, d], and backward writes each segment's
    gradients straight into whole-row tensors, where per-segment slicing made autograd zero-fill a
    whole-row tensor and add it back for every segment's q, k and v. Each segment's queries run in
    blocks (QUERY_BLOCK) against the keys they can see. Keeps the probabilities (as autograd did) and
    recomputes the stacked query copies in backward instead of keeping them."""

    @staticmethod
    def forward(ctx, qk, v, heads: int, bounds: tuple, scale: float, prefix: int):
        T, _, d = qk.shape
        G = v.shape[1]
        q, k = qk[:, :heads], qk[:, heads:]
        covered = bounds[0] == 0 and bounds[-1] == T  # rows outside every segment get zeros
        out = qk.new_empty(T, heads, d) if covered else qk.new_zeros(T, heads, d)
        saved = []
        for a, b, p in _segments(bounds, prefix):
            ks, vs = (
                _with_prefix(k, a, b, p).permute(1, 2, 0),
                _with_prefix(v, a, b, p).transpose(0, 1),
            )  # [G, d, keys], [G, keys, d]
            for qa, qb in query_blocks(b - a):
                scores = torch.baddbmm(
                    _future_bias(qb - qa, qa, heads // G, p, qk.dtype, qk.device),
                    _stacked(q[a + qa : a + qb], G),
                    ks[:, :, : p + qb],
                    alpha=scale,
                )
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
                low = probs.to(qk.dtype)  # as the bmm takes them (probs itself in fp32)
                _unstack_into(out[a + qa : a + qb], torch.bmm(low, vs[:, : p + qb]))
                saved += [probs] if low is probs else [probs, low]
        ctx.heads, ctx.bounds, ctx.scale, ctx.prefix, ctx.covered = heads, bounds, scale, prefix, covered
        ctx.save_for_backward(qk, v, *saved)
        return out.view(T, heads * d)

    @staticmethod
    def backward(ctx, g):
        qk, v, *saved = ctx.saved_tensors
        H, scale = ctx.heads, ctx.scale
        T, _, d = qk.shape
        G = v.shape[1]
        q, k = qk[:, :H], qk[:, H:]
        grad_qk = torch.empty_like(qk)
        grad_q, grad_k = grad_qk[:, :H], grad_qk[:, H:]
        if not ctx.covered:
            grad_q.zero_()
        grad_k.zero_()  # keys gather from every query block (the prefix's from every segment)
        grad_v = torch.zeros_like(v)
        g = g.reshape(T, H, d)
        per = 1 if qk.dtype == torch.float32 else 2
        i = 0
        for a, b, p in _segments(ctx.bounds, ctx.prefix):
            ks, vs = _with_prefix(k, a, b, p).transpose(0, 1), _with_prefix(v, a, b, p).transpose(0, 1)  # [G, p + L, d]
            for qa, qb in query_blocks(b - a):
                probs, low = saved[i], saved[i + per - 1]
                i += per
                n = p + qb  # keys this block sees
                go = _stacked(g[a + qa : a + qb], G)  # [G, H/G * rows, d]
                dv = torch.bmm(low.transpose(1, 2), go)  # [G, n, d]
                dp = torch.bmm(go, vs[:, :n].transpose(1, 2))  # [G, H/G * rows, n]
                ds = torch._softmax_backward_data(dp.float(), probs, -1, torch.float32).to(qk.dtype)
                dq = torch.baddbmm(go.new_empty(go.shape), ds, ks[:, :n], beta=0, alpha=scale)
                dk = torch.baddbmm(
                    dv.new_empty(dv.shape), ds.transpose(1, 2), _stacked(q[a + qa : a + qb], G), beta=0, alpha=scale
                )
                _unstack_into(grad_q[a + qa : a + qb], dq)
                grad_k[a : a + qb] += dk[:, p:].transpose(0, 1)
                grad_v[a : a + qb] += dv[:, p:].transpose(0, 1)
                if p:
                    grad_k[:p] += dk[:, :p].transpose(0, 1)
                    grad_v[:p] += dv[:, :p].transpose(0, 1)
        return grad_qk, grad_v, None, None, None, None


def attention(q, k, v, bounds: list[int], scale: float, prefix: int = 0) -> torch.Tensor:
    """Causal attention within each segment [a, b) of a packed row; with `prefix` n, segment 0 is the
    shared opening [0, n) and every later segment also sees all of it. q [T, H, d], k/v [T, G, d] -> [T, H*d].
    Per-segment ops through autograd: the path for rows with long segments (others: PackedAttention)."""
    T, H, d = q.shape
    G = k.shape[1]
    groups = H // G
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        L = b - a
        if L <= 0:
            continue
        p = prefix if a > 0 else 0  # keys [0, p) before the segment's own
        ks, vs = _with_prefix(k, a, b, p), _with_prefix(v, a, b, p)
        if L > varlen.MATMUL_MAX_LEN:  # long segments: torch's kernel, which never holds L x L per head
            qs = q[a:b]
            if p:  # p placeholder queries in front make plain causal attention see the whole prefix (their
                # rows are dropped): an explicit mask would send torch to its kernel that keeps every L x L
                qs = torch.cat([q.new_zeros(p, H, d), qs])
            o = F.scaled_dot_product_attention(
                qs.transpose(0, 1)[None],
                ks.transpose(0, 1)[None],
                vs.transpose(0, 1)[None],
                is_causal=True,
                scale=scale,
                enable_gqa=groups > 1,
            )
            outs.append(o[0, :, p:].transpose(0, 1).reshape(L, H * d))
            continue
        scores = torch.baddbmm(
            _future_bias(L, 0, groups, p, q.dtype, q.device), _stacked(q[a:b], G), ks.permute(1, 2, 0), alpha=scale
        )
        if q.dtype == torch.float32:
            probs = torch.softmax(scores, dim=-1)
        else:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.bmm(probs, vs.transpose(0, 1))  # [G, groups * L, d]
        outs.append(o.view(G, groups, L, d).permute(2, 0, 1, 3).reshape(L, H * d))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


_bias_cache: dict[tuple, torch.Tensor] = {}


def _future_bias(rows: int, start: int, groups: int, prefix: int, dtype, device) -> torch.Tensor:
    """[groups * rows, prefix + start + rows] for queries at positions start.. start + rows - 1 of their
    segment (row i: position start + i % rows) over the prefix's keys and the segment's first start + rows:
    -inf where a key lies after its query; the prefix's keys are all visible."""
    key = (rows, start, groups, prefix, dtype, str(device))
    if key not in _bias_cache:
        if len(_bias_cache) > 1024:
            _bias_cache.clear()
        future = torch.ones(rows, start + rows, dtype=torch.bool, device=device).triu(start + 1)
        future = torch.cat([torch.zeros(rows, prefix, dtype=torch.bool, device=device), future], dim=1).repeat(
            groups, 1
        )
        _bias_cache[key] = torch.zeros(future.shape, dtype=dtype, device=device).masked_fill(future, float("-inf"))
    return _bias_cache[key]


# --- reading the model -------------------------------------------------------------------------


class _Unsupported(Exception):
    pass


def _linear(module) -> torch.nn.Linear:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _adapters(module, out_offset: int) -> tuple[list[Adapter], list[torch.Tensor]]:
    """The active LoRA adapters of a (peft-wrapped) projection, as column ranges of its group."""
    if type(_linear(module)) is not torch.nn.Linear:
        raise _Unsupported(f"{type(_linear(module)).__name__} base layers (4-bit or custom)")
    if not hasattr(module, "lora_A"):
        return [], []
    if module.merged or module.disable_adapters:
        raise _Unsupported("merged or disabled adapters")
    adapters, ab = [], []
    n_out = _linear(module).out_features
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if (
            module.use_dora.get(name)
            or module.lora_B[name].bias is not None
            or type(module.lora_A[name]) is not torch.nn.Linear
        ):
            raise _Unsupported("DoRA, LoRA bias or non-linear adapters")
        dropout = module.lora_dropout[name]
        p = float(getattr(dropout, "p", 0.0)) if isinstance(dropout, torch.nn.Dropout) else 0.0
        adapters.append(Adapter(out_offset, out_offset + n_out, float(module.scaling[name]), p))
        ab += [module.lora_A[name].weight, module.lora_B[name].weight]
    return adapters, ab


def _group(modules: list, restack: bool, restacked: list) -> Group:
    linears = [_linear(m) for m in modules]
    adapters, ab, offset = [], [], 0
    for m, lin in zip(modules, linears):
        ads, abs_ = _adapters(m, offset)
        adapters += ads
        ab += abs_
        offset += lin.out_features
    if any(lin.weight.requires_grad for lin in linears):
        raise _Unsupported("trainable base weights")
    if len({lin.bias is None for lin in linears}) > 1:
        raise _Unsupported("projections of one group with and without bias")
    if len(linears) == 1:
        weight, bias = linears[0].weight, linears[0].bias
    elif restack:
        weight = _restack([lin.weight for lin in linears])
        bias = _restack([lin.bias for lin in linears]) if linears[0].bias is not None else None
        restacked.append((modules, weight))
    else:
        weight, bias = None, None
    return Group(weight, bias, tuple(adapters), tuple(ab))


def _restack(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """One tensor holding the parameters row after row; each parameter then views its rows."""
    stacked = torch.cat([p.detach() for p in params])
    row = 0
    for p in params:
        p.data = stacked[row : row + p.shape[0]]
        row += p.shape[0]
    return stacked


def _build(base, restack: bool = False) -> Plan:
    inner = base.get_decoder()
    layers, restacked = [], []
    attn0 = inner.layers[0].self_attn
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") for n in norms):
            raise _Unsupported("norms other than RMSNorm")
        if set(dict(layer.named_children())) != {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}:
            raise _Unsupported("layers with parts besides attention, MLP and two norms")
        if set(dict(attn.named_children())) != {"q_proj", "k_proj", "v_proj", "o_proj"}:
            raise _Unsupported("attention with parts besides q/k/v/o projections")
        if set(dict(mlp.named_children())) - {"act_fn"} != {"gate_proj", "up_proj", "down_proj"}:
            raise _Unsupported("MLP other than gate/up/down")
        layers.append(
            LayerPlan(
                in_norm=norms[0].weight,
                post_norm=norms[1].weight,
                eps=norms[0].variance_epsilon,
                qkv=_group([attn.q_proj, attn.k_proj, attn.v_proj], restack, restacked),
                o=_group([attn.o_proj], restack, restacked),
                gate_up=_group([mlp.gate_proj, mlp.up_proj], restack, restacked),
                down=_group([mlp.down_proj], restack, restacked),
            )
        )
    heads = base.config.num_attention_heads
    kv_heads = getattr(base.config, "num_key_value_heads", None) or heads
    return Plan(
        layers,
        inner.norm.weight,
        inner.norm.variance_epsilon,
        heads,
        kv_heads,
        attn0.head_dim,
        attn0.scaling,
        restacked,
    )
