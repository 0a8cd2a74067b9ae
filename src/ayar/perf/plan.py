"""Memory planner: predict a training run's peak memory before it starts, say whether it fits, and if
not, which settings would.

The prediction adds up what training holds at its peak (the end of the forward pass of the largest
micro-batch, when every layer's saved activations are alive):
    weights (by dtype) + adapter (fp32) + its gradients + AdamW's two states
    + activations: tokens x layers x (what one decoder layer saves for backward) x dtype bytes
    + logits: ayar computes them for trained positions only, in fp32, with their softmax gradient
    + on CPU, one layer's attention weights (heads x len x len) + the runtime itself (Python, torch, transformers).
The activation terms come from what autograd saves; their two coefficients were fitted on measured
peaks of 4 configurations and checked on 4 others (benchmarks/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Constants (see benchmarks/README.md, "memory planner"). BASE_ACTIVATION_FACTOR was fitted, with the LoRA
# term's, on 4 measured configurations and checked on 4 others; the runtime sizes are estimates.
RUNTIME_BYTES_CPU = 900 * 2**20  # python + torch + transformers + tokenizer, process RSS before the model loads
RUNTIME_BYTES_CUDA = 400 * 2**20  # CUDA context and allocator reserve beyond tensors
BASE_ACTIVATION_FACTOR = 1.16  # allocator overhead and small saved tensors over the counted base activations
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Shape:
    params: int
    layers: int
    hidden: int
    intermediate: int
    kv: int  # n_kv_heads * head_dim
    vocab: int
    lora_params: int
    heads: int = 1
    lora_inputs: int = 0  # per layer: summed input features of the LoRA-wrapped projections
    linear_params: int = 0  # weights of the linear layers (not the output head): what QLoRA stores in 4 bits


@dataclass
class MemoryPlan:
    parts: dict = field(default_factory=dict)  # name -> bytes
    available: int = 0
    device: str = "cpu"
    tokens: int = 0  # tokens in the largest micro-batch
    trained: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    def table(self) -> str:
        gb = lambda b: f"{b / 2**30:6.2f} GB"
        lines = [f"  {name:<24}{gb(b)}" for name, b in self.parts.items()]
        lines.append(f"  {'predicted peak':<24}{gb(self.total)}   (largest micro-batch: {self.tokens} tokens, {self.trained} trained)")
        lines.append(f"  {'available':<24}{gb(self.available)}   ({self.device})")
        return "\n".join(lines)


def model_shape(hf_config, target_modules, r: int) -> Shape:
    """Sizes from the model's config: the model is built on the meta device (no memory), so parameter and
    LoRA counts are exact for any architecture, fused projections included."""
    import torch
    from transformers import AutoModelForCausalLM

    from ayar.models.adapters import matches_target

    c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    params = sum(p.numel() for p in model.parameters())
    output = model.get_output_embeddings()
    wrapped = [m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not output and matches_target(name, target_modules)]
    lora = sum(r * (m.in_features + m.out_features) for m in wrapped)
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", heads) * (getattr(c, "head_dim", None) or c.hidden_size // heads)
    layers = c.num_hidden_layers
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output)
    return Shape(params, layers, c.hidden_size, c.intermediate_size, kv, c.vocab_size, lora, heads,
                 sum(m.in_features for m in wrapped) // layers, linear)


def activation_bytes_per_token(s: Shape, dtype_bytes: int, lora: bool, dropout: bool = True) -> int:
    """What training keeps per token at its peak. Base layers (frozen): attention's q/k/v/output and the
    MLP's gate/up/activation products in the weights' dtype, and RMSNorm's fp32 copies, times the measured
    allocator overhead. LoRA: every wrapped projection's input copied to fp32 (peft casts inputs to the
    adapter's dtype), plus, with dropout, its fp32 output and mask."""
    base = (2 * s.hidden + 2 * s.kv + 3 * s.intermediate) * dtype_bytes + 16 * s.hidden
    per_layer = base * BASE_ACTIVATION_FACTOR
    if lora and dtype_bytes == 4:
        per_layer += s.lora_inputs * (4 + (5 if dropout else 0))
    elif lora:  # bf16/fp16 base: adapters run under autocast on the input as it is (train/loss.py)
        per_layer += s.lora_inputs * ((dtype_bytes + 1) if dropout else 0)
    return int(s.layers * per_layer)


def attention_scratch_bytes(s: Shape, rows: int, row_len: int) -> int:
    """The attention weights one layer materializes at a time (heads x len x len, fp32 softmax) on CPU."""
    return rows * s.heads * row_len**2 * 4


def plan_memory(shape: Shape, *, weight_dtype: str, device: str, tokens: int, trained: int, method: str = "lora",
                available: int | None = None, rows: int = 1, dropout: bool = True) -> MemoryPlan:
    """`tokens` in the largest micro-batch, laid out as `rows` rows of equal length (1 row when packed)."""
    wb = _BYTES[weight_dtype]
    parts = {"weights": shape.params * wb}
    if method in ("qlora", "qdora"):  # NF4 + double-quantized scales (~4.13 bits); the rest upcast to fp32 for stability
        parts["weights"] = int(shape.linear_params * 0.516) + (shape.params - shape.linear_params) * 4
    adapter = method in ("lora", "dora", "qlora", "qdora")
    if adapter:
        parts["adapter + grads + AdamW"] = shape.lora_params * 4 * 4
    else:
        parts["grads + AdamW (full)"] = shape.params * (wb + 8)
    parts["activations"] = tokens * activation_bytes_per_token(shape, wb, adapter, dropout)
    if device == "cpu":
        parts["attention scratch"] = attention_scratch_bytes(shape, rows, tokens // max(rows, 1))
    parts["logits (trained tokens)"] = trained * shape.vocab * 4 * 3
    parts["runtime"] = RUNTIME_BYTES_CPU if device == "cpu" else RUNTIME_BYTES_CUDA
    return MemoryPlan(parts, available if available is not None else available_memory(device), device, tokens, trained)


def available_memory(device: str) -> int:
    """Free memory for a new run: $AYAR_MEMORY_LIMIT_MB when set; on CUDA the device's free memory; on CPU
    the system's available RAM, capped by the container's cgroup limit when there is one."""
    import os

    if os.environ.get("AYAR_MEMORY_LIMIT_MB"):
        return int(float(os.environ["AYAR_MEMORY_LIMIT_MB"]) * 2**20)
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free
    import psutil

    avail = psutil.virtual_memory().available
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def largest_micro_batch(examples, batch_size: int, packing: bool, per_pass: int = 0) -> tuple[int, int, int]:
    """(tokens, trained tokens, rows) of the worst forward/backward pass: the longest examples together
    (batch_size of them, or per_pass when a micro-batch runs in passes), packed into one row or padded."""
    n = per_pass if 0 < per_pass < batch_size else batch_size
    longest = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)[:n]
    if not longest:
        return 0, 0, 1
    if packing:
        return sum(len(e.input_ids) for e in longest), sum(e.n_trained for e in longest), 1
    return len(longest[0].input_ids) * len(longest), sum(e.n_trained for e in longest), len(longest)


def suggestions(shape: Shape, cfg, examples, weight_dtype: str, device: str, available: int) -> list[str]:
    """Settings that would fit, each changing one thing (the effective batch is kept where possible)."""
    out = []
    per_pass = _per_pass(cfg, device)
    for rpp in (2, 1):
        if per_pass and per_pass <= rpp or cfg.training.batch_size <= rpp:
            continue
        tokens, trained, rows = largest_micro_batch(examples, cfg.training.batch_size, cfg.training.packing, rpp)
        if plan_memory(shape, weight_dtype=weight_dtype, device=device, tokens=tokens, trained=trained, available=available,
                       rows=rows, dropout=cfg.lora.dropout > 0).fits:
            out.append(f"training.rows_per_pass={rpp} (same batches and gradient, in smaller passes)")
            break
    bs, ga = cfg.training.batch_size, cfg.training.grad_accum
    b = bs
    while b > 1:
        b //= 2
        tokens, trained, rows = largest_micro_batch(examples, b, cfg.training.packing, per_pass)
        if plan_memory(shape, weight_dtype=weight_dtype, device=device, tokens=tokens, trained=trained, available=available,
                       rows=rows, dropout=cfg.lora.dropout > 0).fits:
            out.append(f"training.batch_size={b} training.grad_accum={ga * bs // b} (same effective batch)")
            break
    for max_len in (cfg.data.max_length // 2, cfg.data.max_length // 4):
        clipped = [_Clip(e, max_len) for e in examples]
        tokens, trained, rows = largest_micro_batch(clipped, bs, cfg.training.packing, per_pass)
        if max_len >= 64 and plan_memory(shape, weight_dtype=weight_dtype, device=device, tokens=tokens, trained=trained,
                                         available=available, rows=rows, dropout=cfg.lora.dropout > 0).fits:
            out.append(f"data.max_length={max_len} (longer rows are truncated)")
            break
    if weight_dtype == "float32":
        out.append("model.dtype=bfloat16 (halves weights and activations; on CPU only fast with AVX512-BF16/AMX)")
    return out


class _Clip:
    def __init__(self, e, n):
        self.input_ids = e.input_ids[:n]
        self.n_trained = min(e.n_trained, n)


def plan_for_config(cfg, log=print):
    """Plan a TrainConfig without loading the weights: model config, tokenizer and (cached) tokenized data."""
    import dataclasses

    from transformers import AutoConfig

    from ayar.data.dataset import prepare_data
    from ayar.models.device import choose_placement
    from ayar.models.load import load_tokenizer, resolve_model_path

    path = resolve_model_path(cfg.model.name, log=log)
    placement = choose_placement(cfg.model.device, cfg.model.dtype)
    shape = model_shape(AutoConfig.from_pretrained(path), cfg.lora.target_modules, cfg.lora.r)
    data = prepare_data(dataclasses.replace(cfg.data, lint="off"), load_tokenizer(path), seed=cfg.training.seed)
    return plan_from_examples(shape, cfg, data.train, placement)


def plan_from_examples(shape: Shape, cfg, examples, placement) -> tuple[MemoryPlan, list[str]]:
    dtype = placement.dtype_name
    tokens, trained, rows = largest_micro_batch(examples, cfg.training.batch_size, cfg.training.packing,
                                                _per_pass(cfg, placement.device))
    plan = plan_memory(shape, weight_dtype=dtype, device=placement.device, tokens=tokens, trained=trained, method=cfg.method,
                       rows=rows, dropout=cfg.lora.dropout > 0)
    return plan, ([] if plan.fits else suggestions(shape, cfg, examples, dtype, placement.device, plan.available))


def _per_pass(cfg, device: str) -> int:
    from ayar.train.loop import rows_per_pass

    return rows_per_pass(cfg.training, device)
