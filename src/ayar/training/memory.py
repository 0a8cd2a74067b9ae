"""Memory planner: predict a training run's peak memory before it starts, say whether it fits, and if
not, which settings would.

The prediction adds up what training holds at its peak (the end of the forward pass of the largest
pass, when every layer's saved activations are alive):
    weights (by dtype) + adapter (fp32) + its gradients + AdamW's two states
    + activations: tokens x layers x (what one decoder layer saves for backward) x dtype bytes, for the
      path the loop will take (fused decoder or transformers + peft modules); with gradient
      checkpointing, each layer's input plus one layer's activations (and their gradients) at a time
    + per-example attention (packed rows on CPU): the attention probabilities of every layer
    + logits: ayar computes them for trained positions only, a chunk of positions at a time (the full
      [trained, vocab] fp32 logits and their gradient where a custom loss or a trained head needs them)
    + the runtime itself (Python, torch, transformers, tokenizer).
The activation terms count what autograd saves, tensor by tensor (checked against saved-tensor hooks in
tests/unit/test_perf.py); the measured peaks they were checked against are in benchmarks/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ayar.training.distributed import BUCKET_BYTES

# Constants (see benchmarks/README.md, "memory planner").
RUNTIME_BYTES_CPU = 500 * 2**20  # python + torch + transformers + tokenizer: 470 MB RSS measured before the model loads
RUNTIME_BYTES_CUDA = 400 * 2**20  # CUDA context and allocator reserve beyond tensors (an estimate)
# bf16/fp16 matmuls on CPU: oneDNN's two primitive caches, held at 128 shapes each (ayar/__init__.py):
# 133 MB measured after 400 new shapes
ONEDNN_CACHE_BYTES = 133 * 2**20
# the Trainer stages' imports beyond ayar's own loop (TRL, datasets): 88 MB RSS measured
TRL_RUNTIME_BYTES = 90 * 2**20
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZED = ("qlora", "qdora")
# QLoRA's NF4 base: half a byte per weight, and its quant state (bitsandbytes' double quantization: a uint8 scale per
# 64 weights, an fp32 one per 256 of those), which is no parameter: FSDP splits the packed bytes, not the state
NF4_BYTES, NF4_STATE_BYTES = 0.5, 1 / 64 + 4 / (64 * 256)
# DeepSpeed ZeRO-3's defaults (stage3_max_live_parameters, stage3_max_reuse_distance: 1e9 parameters each) keep a
# gathered weight whole until it is used again within that many parameters: every weight of a smaller model stays
# gathered from its forward to its backward (measured: benchmarks/README.md), of a larger one about this many
ZERO3_LIVE_PARAMS = 10**9


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
    lora_distinct_inputs: int = 0  # the same, counting once the inputs projections share (q/k/v, gate/up)
    lora_outputs: int = 0  # per layer: r x wrapped projections (what each adapter's A saves for its B)
    linear_params: int = 0  # weights of the linear layers (not the output head): what QLoRA stores in 4 bits
    plain_attention: bool = False  # packed rows can take per-example attention on CPU (kernels/varlen.py)
    fused_family: bool = False  # the fused decoder can run this architecture (kernels/fused_decoder.py)
    plain_head: bool = True  # no logit soft-capping: the chunked cross-entropy applies (training/loss.py)
    # per layer: input features of a wrapped attention output projection, whose input (the attention's output) the
    # attention keeps for its own backward anyway
    lora_attention_out: int = 0
    # the dtype the checkpoint's weights are stored in (None: not known); loading into another dtype converts them
    stored_dtype: str | None = None
    # per layer, over all its linear layers wrapped or not (what a full fine-tune's weight gradients and ZeRO-3's
    # linears keep): summed input features, and the distinct inputs (q/k/v share one, gate/up another)
    linear_inputs: int = 0
    linear_distinct_inputs: int = 0
    tied_head: bool = False  # the output head is the input embedding's weight


@dataclass(frozen=True)
class Pass:
    """A forward/backward pass of a run: tokens, trained tokens, rows, and the examples' segment lengths; `prefix`: the
    opening a padding-free row of the fused decoder computes once and every later segment attends to
    (data/collate.py `share_prefix`; `lengths` are then each example's tokens after it)."""

    tokens: int
    trained: int
    rows: int
    lengths: tuple = ()
    prefix: int = 0

    def _segments(self) -> list[tuple[int, int]]:
        """(own length, prefix keys it sees) per attention segment, the shared opening's own included."""
        return [(n, self.prefix) for n in self.lengths] + ([(self.prefix, 0)] if self.prefix else [])

    def attention_keys(self, blocked: bool = False) -> float:
        """Keys per query token of per-example attention with saved probabilities (segments short enough
        for the matmul path; longer ones run torch's kernel, which keeps none). `blocked`: the fused
        decoder, whose query blocks see only the keys up to their last query, when no segment is long."""
        from ayar.kernels.varlen import MATMUL_MAX_LEN

        segments = self._segments()
        short = [(n, p) for n, p in segments if n <= MATMUL_MAX_LEN]
        if blocked and len(short) == len(segments):
            from ayar.kernels.fused_decoder import query_blocks

            return sum((b - a) * (p + b) for n, p in short for a, b in query_blocks(n)) / max(self.tokens, 1)
        return sum(n * (n + p) for n, p in short) / max(self.tokens, 1)

    def long_share(self) -> float:
        """The share of tokens in segments that per-example attention gives to torch's kernel."""
        from ayar.kernels.varlen import MATMUL_MAX_LEN

        return sum(n for n, _ in self._segments() if n > MATMUL_MAX_LEN) / max(self.tokens, 1)

    def opening_copies(self) -> tuple[float, float]:
        """Per token: rows of key/value copies, and of query copies, that the fused decoder's per-segment attention
        (a pass with a long segment) makes where the examples share an opening: each segment's keys and values after
        the opening's, a long segment's queries after as many placeholder rows (kernels/fused_decoder.py)."""
        from ayar.kernels.varlen import MATMUL_MAX_LEN

        if not self.prefix or not self.long_share():
            return 0.0, 0.0
        rows = [n + self.prefix for n in self.lengths]
        return sum(rows) / self.tokens, sum(r for r, n in zip(rows, self.lengths) if n > MATMUL_MAX_LEN) / self.tokens


@dataclass(frozen=True)
class Layout:
    """How the training loop runs passes (decided in training/plan.py): rows per pass, padding-free or padded
    rows, fused decoder or modules, gradient checkpointing."""

    per_pass: int
    packed: bool
    fused: bool = False
    checkpointing: bool = False


@dataclass
class MemoryPlan:
    parts: dict = field(default_factory=dict)  # name -> bytes
    available: int = 0
    device: str = "cpu"
    tokens: int = 0  # tokens in the pass that holds the most (the longest, or see `candidate_passes`)
    trained: int = 0
    offloaded: int = 0  # bytes a rank keeps in CPU RAM instead (ZeRO / FSDP offload), not in `total`
    per_rank: str = ""  # how the numbers are per process (sharding), when there are several
    heaviest: Pass | None = None  # the pass planned for (ayar's own loop: `plan_layout`)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    def _examples(self) -> str:
        if not self.heaviest or not self.heaviest.lengths:
            return ""
        p = self.heaviest
        sizes = sorted({n + p.prefix for n in p.lengths})
        span = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        opening = f", an opening of {p.prefix} shared" if p.prefix else ""
        return f"; {len(p.lengths)} example{'s' * (len(p.lengths) > 1)} of {span} tokens{opening}"

    def table(self) -> str:
        gb = lambda b: f"{b / 2**30:6.2f} GB"
        lines = [f"  {name:<24}{gb(b)}" for name, b in self.parts.items()]
        lines.append(
            f"  {'predicted peak':<24}{gb(self.total)}   (heaviest pass: {self.tokens} tokens, "
            f"{self.trained} trained{self._examples()})"
        )
        lines.append(
            f"  {'available':<24}{gb(self.available)}   ({self.device}{', per rank' if self.per_rank else ''})"
        )
        if self.offloaded:
            lines.append(f"  {'offloaded to CPU RAM':<24}{gb(self.offloaded)}   (per rank, not in the peak above)")
        if self.per_rank:
            lines.append(f"  {self.per_rank}")
        return "\n".join(lines)


STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")


@dataclass(frozen=True)
class Sharding:
    """How N data-parallel processes split what training holds: ddp (every rank all of it), zero2 (gradients and
    optimizer states split), zero3 / fsdp (weights split too; FSDP gathers each layer whole while it computes,
    DeepSpeed keeps up to ZERO3_LIVE_PARAMS gathered from forward to backward);
    `offload`: optimizer states (zero2), and weights (zero3), or weights, gradients and states (fsdp) in CPU RAM."""

    nproc: int = 1
    strategy: str = "ddp"
    offload: bool = False

    @property
    def splits_weights(self) -> bool:
        """Whether each process holds a part of every weight (FSDP, ZeRO-3), not the whole model."""
        return self.strategy in ("zero3", "fsdp")


def per_rank(
    plan: MemoryPlan, shape: Shape, sharding: Sharding, zero3_inputs: int = 0, quantized: bool = False
) -> MemoryPlan:
    """The plan of one rank. Activations, logits and the runtime are each rank's own (its micro-batch);
    `zero3_inputs`: what ZeRO-3's linears keep beyond them (`zero3_linear_inputs`); `quantized`: the linears'
    weights in NF4 (QLoRA/QDoRA), the rest as `quantized_weight_bytes` counts it."""
    import math

    n, strategy, parts = sharding.nproc, sharding.strategy, dict(plan.parts)
    adapter = ADAPTER_STATES in parts
    trainable = shape.lora_params if adapter else shape.params
    grads, adam = trainable * 4, trainable * 8
    offloaded = 0
    if strategy == "ddp" and n > 1:  # the gradients all-reduced in buckets (training/distributed.py)
        parts["gradient all-reduce buffer"] = min(grads, BUCKET_BYTES)
    if sharding.splits_weights:
        whole = parts["weights"]
        state = int(shape.linear_params * NF4_STATE_BYTES) if quantized else 0  # every rank's whole
        parts["weights"] = math.ceil((whole - state) / n) + state
        if n > 1 and strategy == "fsdp" and shape.linear_params:
            # two decoder layers (the one computing, the next prefetched) and FSDP2's root unit (embeddings, head,
            # final norm), which stays gathered from forward to backward
            root = shape.params - shape.linear_params  # outside the decoder layers' linears (norms: a few KB)
            linear_b, root_b = (
                (NF4_BYTES, (whole - nf4_bytes(shape)) / root) if quantized else (whole / shape.params,) * 2
            )
            parts["gathered layers + root unit"] = int(
                2 * shape.linear_params / shape.layers * linear_b + root * root_b
            )
        elif n > 1 and strategy == "zero3":
            parts["gathered weights (ZeRO-3)"] = int(whole * min(1.0, ZERO3_LIVE_PARAMS / shape.params))
            if zero3_inputs:
                parts["linear inputs (ZeRO-3)"] = zero3_inputs
        elif n > 1:  # the layer computing and the next one, prefetched
            parts["gathered layers"] = 2 * whole // shape.layers
        if sharding.offload:
            offloaded += parts.pop("weights")
    if strategy in ("zero2", "zero3", "fsdp") and adapter:
        parts[ADAPTER_STATES] = math.ceil(parts[ADAPTER_STATES] / n)
        if sharding.offload:
            moved = math.ceil((adam + (grads if strategy == "fsdp" else 0)) / n)
            parts[ADAPTER_STATES] -= moved
            offloaded += moved
    elif strategy in ("zero2", "zero3", "fsdp"):
        for key in (FULL_GRADIENTS, FULL_STATES):
            parts[key] = math.ceil(parts[key] / n)
        if sharding.offload:
            offloaded += parts.pop(FULL_STATES) + (parts.pop(FULL_GRADIENTS) if strategy == "fsdp" else 0)
    how = {
        "ddp": "every rank holds the whole model and its optimizer",
        "zero2": "gradients and optimizer states split across ranks",
        "zero3": "weights, gradients and optimizer states split across ranks",
        "fsdp": "weights, gradients and optimizer states split across ranks (FSDP full shard)",
    }[strategy]
    note = f"per rank of {n} ({strategy}: {how}{', offloaded to CPU' if sharding.offload else ''})"
    if n == 1 and not sharding.offload:
        note = ""
    return MemoryPlan(parts, plan.available, plan.device, plan.tokens, plan.trained, offloaded, note, plan.heaviest)


def model_shape(
    hf_config, target_modules, r: int, stored_dtype: str | None = None, modules_to_save: list | None = None
) -> Shape:
    """Sizes from the model's config: the model is built on the meta device (no memory), so parameter and
    LoRA counts are exact for any architecture, fused projections included. `stored_dtype`: the checkpoint's
    (`models.load.stored_dtype`; a loaded model's config names the dtype it was loaded in). `modules_to_save`
    (`lora.modules_to_save`): modules trained in full beside the adapters, counted with them (`lora_params`): peft
    trains an fp32 copy of each (models/adapters.py `trainable_in_fp32`), with its gradient and AdamW states."""
    import torch
    from transformers import AutoModelForCausalLM

    from ayar.models.adapters import matches_target

    c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    params = sum(p.numel() for p in model.parameters())
    output = model.get_output_embeddings()
    wrapped = [
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not output and matches_target(name, target_modules)
    ]
    lora = sum(r * (m.in_features + m.out_features) for m in wrapped)
    # peft's rule (peft/utils/other.py `_set_trainable`): every module whose name ends with an entry
    full = [m for name, m in model.named_modules() if name and any(name.endswith(t) for t in modules_to_save or ())]
    lora += sum(p.numel() for m in full for p in m.parameters())
    distinct, attention_out = _inputs(model, wrapped)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output]
    all_distinct, _ = _inputs(model, linears)
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", heads) * (getattr(c, "head_dim", None) or c.hidden_size // heads)
    layers = c.num_hidden_layers
    linear = sum(m.weight.numel() for m in linears)
    from ayar.kernels import fused_decoder, varlen

    return Shape(
        params,
        layers,
        c.hidden_size,
        c.intermediate_size,
        kv,
        c.vocab_size,
        lora,
        heads,
        sum(m.in_features for m in wrapped) // layers,
        distinct // layers,
        r * len(wrapped) // layers,
        linear,
        varlen.supported(c, "cpu"),
        fused_decoder.config_reason(c, "cpu") is None,
        not getattr(c, "final_logit_softcapping", None),
        attention_out // layers,
        stored_dtype,
        sum(m.in_features for m in linears) // layers,
        all_distinct // layers,
        output is not None and output.weight is model.get_input_embeddings().weight,
    )


def _inputs(model, linears) -> tuple[int, int]:
    """The input features of `linears` (modules of `model`), counting once an input projections share (q/k/v read
    the same tensor, as do gate/up), and those of attention output projections among them."""
    distinct, attention_out, chosen = {}, 0, {id(m) for m in linears}
    for name, m in model.named_modules():
        if id(m) in chosen:
            parent, _, leaf = name.rpartition(".")
            distinct[(parent, _SHARED_INPUT.get(leaf, leaf))] = m.in_features
            attention_out += m.in_features if leaf in _ATTENTION_OUT and "att" in parent.rpartition(".")[2] else 0
    return sum(distinct.values()), attention_out


_ATTENTION_OUT = ("o_proj", "out_proj", "dense", "c_proj")
_SHARED_INPUT = {
    "q_proj": "attn",
    "k_proj": "attn",
    "v_proj": "attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "w1": "mlp",
    "w3": "mlp",
}


def layer_bytes_per_token(
    s: Shape,
    dtype_bytes: int,
    lora: bool,
    dropout: bool = True,
    fused: bool = False,
    long_share: float = 0.0,
    masks: bool = False,
) -> float:
    """What one decoder layer keeps per token for backward (attention probabilities aside), tensor by tensor.
    Fused decoder (kernels/ops.py): two norm inputs and outputs, v, rotated q/k, the attention output, gate/up
    and their product, each adapter's A output (dropout masks are not kept: kernels/dropout.py); a pass with
    long segments (autograd through torch's attention kernel) also keeps the stacked queries, and its long
    segments' query/key/value copies.
    Modules, fp32 (CPU): the two RMSNorm inputs, each segment's query copy, k and v, gate, up and
    SiLU(gate); each adapter's dropped-out input (fp32), or without dropout the distinct inputs (q/k/v
    share one), and its A output. bf16/fp16 modules: the two RMSNorm inputs upcast to fp32, each segment's query
    copy, k and v, gate, up and SiLU(gate); the adapters run under autocast on their input as it is
    (training/loss.py): the distinct inputs and the A outputs in the half dtype, and dropout makes each adapter's
    input its own copy where those without it share one, or share the attention's output (ayar's dropout on a CPU
    keeps no mask: kernels/dropout.py);
    `masks`: torch's dropout (a GPU's), counted as a mask byte beside a copy for every adapter input.
    Without adapters (a full fine-tune, always on modules; fp32 master weights, a half dtype's compute under
    autocast), the same base, and what trained weights need for their gradients: each RMSNorm's normalized input
    (fp32, as its weight) and every linear layer's input, in the compute dtype: under autocast each layer casts the
    fp32 input for itself, so q/k/v (and gate/up) keep a copy each where in fp32 they share one."""
    lora_out = s.lora_outputs * 4 if lora else 0
    if fused:
        q = s.hidden  # heads * head_dim for the families ayar fuses
        kept = 4 * s.hidden + (3 if long_share else 2) * q + 2 * s.kv + 3 * s.intermediate + long_share * (q + s.kv)
        return kept * dtype_bytes + lora_out + 8
    # modules: a segment through torch's attention kernel (longer than MATMUL_MAX_LEN on a CPU, every one on a GPU)
    # keeps its output and log-sum-exp; a shorter one its probabilities (`attention_keys`)
    kernel = long_share * (s.hidden * dtype_bytes + s.heads * 4)
    inputs = s.linear_inputs if dtype_bytes < 4 else s.linear_distinct_inputs
    weights = 0 if lora else 2 * s.hidden * 4 + inputs * dtype_bytes  # a full fine-tune's weight gradients
    if dtype_bytes == 4:
        base = (2 * s.hidden + s.hidden + 2 * s.kv + 3 * s.intermediate) * 4 + kernel + weights
        adapters = (s.lora_inputs if dropout else s.lora_distinct_inputs) * 4 if lora else 0
        return base + adapters + lora_out
    base = 2 * s.hidden * 4 + (s.hidden + 2 * s.kv + 3 * s.intermediate) * dtype_bytes + kernel + weights
    if lora:
        base += (s.lora_distinct_inputs + s.lora_outputs) * dtype_bytes
    if not (lora and dropout):
        return base
    return base + (
        s.lora_inputs * (dtype_bytes + 1)
        if masks
        else (s.lora_inputs - s.lora_distinct_inputs + s.lora_attention_out) * dtype_bytes
    )


def activation_bytes_per_token(
    s: Shape,
    dtype_bytes: int,
    lora: bool,
    dropout: bool = True,
    fused: bool = False,
    attention_keys: float = 0.0,
    checkpointing: bool = False,
    long_share: float = 0.0,
    masks: bool = False,
    opening_copies: tuple[float, float] = (0.0, 0.0),
) -> int:
    """What training keeps per token at its peak, over all layers. Per-example attention on packed rows
    keeps each layer's probabilities (heads x keys, fp32, plus a copy in a half dtype); `opening_copies`:
    `Pass.opening_copies`. With gradient
    checkpointing, each layer's input is kept, and one layer's activations live at a time, with as much
    again for their gradients while that layer's backward runs (measured: benchmarks/README.md). A full fine-tune
    also keeps the final norm's input and normalized input (fp32), and the trained head's input."""
    per_layer = layer_bytes_per_token(s, dtype_bytes, lora, dropout, fused, long_share, masks)
    per_layer += s.heads * attention_keys * (4 + (dtype_bytes if dtype_bytes < 4 else 0))
    per_layer += (opening_copies[0] * 2 * s.kv + opening_copies[1] * s.hidden) * dtype_bytes
    head = 0 if lora else s.hidden * (8 + dtype_bytes)
    if checkpointing:
        return int(s.layers * s.hidden * dtype_bytes + 2 * per_layer + head)
    return int(s.layers * per_layer + head)


def autocast_weight_copies(shape: Shape, compute_bytes: int, checkpointing: bool = False) -> int:
    """What autocast adds over fp32 master weights: each linear layer's weight (the output head's too) cast to the
    compute dtype once per pass and kept for backward, where its input's gradient needs it: every layer's at once, or
    with gradient checkpointing the recomputed layer's (a forward without gradients keeps none)."""
    linears = shape.linear_params / shape.layers if checkpointing else shape.linear_params
    return int((linears + shape.vocab * shape.hidden) * compute_bytes)


def attention_scratch_bytes(s: Shape, rows: int, row_len: int) -> int:
    """The attention weights one layer materializes at a time (heads x len x len, fp32 softmax) on CPU."""
    return rows * s.heads * row_len**2 * 4


def plan_memory(
    shape: Shape,
    *,
    weight_dtype: str,
    device: str,
    tokens: int,
    trained: int,
    method: str = "lora",
    available: int | None = None,
    rows: int = 1,
    dropout: bool = True,
    fused: bool = False,
    attention_keys: float = 0.0,
    checkpointing: bool = False,
    long_share: float = 0.0,
    packed: bool = False,
    chunked_logits: bool = True,
    opening_copies: tuple[float, float] = (0.0, 0.0),
    compute_dtype: str | None = None,
    one_pass_steps: bool = False,
) -> MemoryPlan:
    """`tokens` in the largest pass, laid out as `rows` rows of equal length (1 row when packed);
    `compute_dtype`: a full fine-tune's autocast dtype over its fp32 master weights (the run plan's `autocast`);
    `one_pass_steps`: every optimizer step is one pass (`full_gradients`);
    `attention_keys`: keys per token of per-example attention (`Pass.attention_keys`, 0 otherwise);
    `long_share`: the share of tokens in segments longer than that (`Pass.long_share`), which go through torch's
    attention kernel: all of them (1) where attention is not per example (padded rows, a GPU)."""
    wb = _BYTES[weight_dtype]
    cb = activation_bytes(method, weight_dtype, compute_dtype)  # what activations are kept in
    parts = {"weights": shape.params * wb}
    if method in QUANTIZED:
        parts["weights"] = quantized_weight_bytes(shape, weight_dtype)
    adapter = method in ("lora", "dora", "qlora", "qdora")
    if adapter:
        parts[ADAPTER_STATES] = shape.lora_params * 4 * 4
    else:  # fp32 master weights (training/plan.py `decide`): fp32 gradients, set at the end (`full_gradients`)
        parts[FULL_GRADIENTS], parts[FULL_STATES] = 0, shape.params * 8
    if fused and shape.stored_dtype in (None, weight_dtype):
        # q/k/v and gate/up weights restacked into one tensor each: a copy while the loaded weights stay file-mapped
        # (safetensors loaded in their own dtype); weights converted as they load are the process's own memory, which
        # restacking frees (measured: benchmarks/README.md)
        q = shape.hidden
        parts["fused weight stacks"] = shape.layers * shape.hidden * (q + 2 * shape.kv + 2 * shape.intermediate) * wb
    parts["activations"] = tokens * activation_bytes_per_token(
        shape, cb, adapter, dropout, fused, attention_keys, checkpointing, long_share, device != "cpu", opening_copies
    )
    if cb < wb:
        parts["weights cast for compute (autocast)"] = autocast_weight_copies(shape, cb, checkpointing)
    if device == "cpu" and not packed:  # padded rows: one layer's [rows, heads, len, len] attention weights
        parts["attention scratch"] = attention_scratch_bytes(shape, rows, tokens // max(rows, 1))
    if chunked_logits:  # one chunk's fp32 logits (on CPU one vocabulary block of them) and softmax, and the
        # gradient for the trained positions' states
        from ayar.kernels.ops import CE_CHUNK, VOCAB_BLOCK, online_softmax

        vocab = min(shape.vocab, VOCAB_BLOCK) if online_softmax(device) else shape.vocab
        parts["logits (trained tokens)"] = min(trained, CE_CHUNK) * vocab * 4 * 2 + trained * shape.hidden * 4
    else:  # fp32 logits, their softmax and its gradient
        parts["logits (trained tokens)"] = trained * shape.vocab * 4 * 3
    parts["runtime"] = RUNTIME_BYTES_CPU if device == "cpu" else RUNTIME_BYTES_CUDA
    if device == "cpu" and _BYTES[compute_dtype or weight_dtype] < 4:  # the matmuls' dtype (a 4-bit base's too)
        parts["runtime"] += ONEDNN_CACHE_BYTES
    if not adapter:
        parts[FULL_GRADIENTS] = full_gradients(parts, shape, one_pass_steps, tokens * shape.hidden * cb, checkpointing)
    return MemoryPlan(parts, available if available is not None else available_memory(device), device, tokens, trained)


ADAPTER_STATES = "adapter + grads + AdamW"
FULL_GRADIENTS, FULL_STATES = "gradients (full)", "AdamW (full)"
# what lives across passes; every other part is the pass's own, freed by the end of its backward
_HELD = ("weights", ADAPTER_STATES, FULL_GRADIENTS, FULL_STATES, "fused weight stacks", "runtime")


def full_gradients(parts: dict, shape: Shape, one_pass_steps: bool, layer_input: int, checkpointing: bool) -> int:
    """A full fine-tune's fp32 gradients at the peak, beyond the pass. All of them, where a step takes several passes
    (they add up across its passes). Where every step is one pass there are none while its forward runs (the last
    step's were set to None); backward makes the output head's first, as the logits it had kept are freed, then a
    layer's each time it frees that layer's activations. The peak holds the largest of: the pass; the pass with the
    head's gradient in place of its logits; every gradient, with the first layer's activations and theirs (with
    gradient checkpointing, the recomputed layer: the activations part but the layers' inputs, `layer_input` each)
    and, where the head is the embedding's weight, the embedding's own gradient, made before it is added in
    (measured: benchmarks/README.md)."""
    grads = shape.params * 4
    if not one_pass_steps:
        return grads
    freed = sum(v for k, v in parts.items() if k not in _HELD)
    head = parts.get("logits (trained tokens)", 0)
    activations = parts.get("activations", 0)
    last = activations - shape.layers * layer_input if checkpointing else 2 * activations // shape.layers
    end = grads + last + (shape.vocab * shape.hidden * 4 if shape.tied_head else 0)
    return max(0, shape.vocab * shape.hidden * 4 - head, end - freed)


# What a Trainer stage's head computes from the last hidden states (training/trainer_plan.py `trainer_pass`): TRL's
# fused LM head (per-token log-probabilities in tiles: DPO, IPO, KTO, GRPO), the whole [rows, length, vocabulary]
# logits (TRL's ORPO and SimPO), or a classifier's few scores (reward model, classification)
TRAINER_HEADS = ("fused", "logits", "score")
FULL_LOGITS_COPIES = 4  # ORPO / SimPO: the logits and fp32 copies taken by log-softmax and its backward (an estimate)


def quantized_weight_bytes(shape: Shape, weight_dtype: str) -> int:
    """A QLoRA/QDoRA model's weights: NF4 + double-quantized scales (~4.13 bits) for the linear layers, the rest
    (norms, embeddings, head) in `quantized_rest_dtype` (models/adapters.py)."""
    from ayar.models.adapters import quantized_rest_dtype

    rest = _BYTES[quantized_rest_dtype(weight_dtype)]
    return nf4_bytes(shape) + (shape.params - shape.linear_params) * rest


def nf4_bytes(shape: Shape) -> int:
    """The linear layers' weights in NF4 with their double-quantized block scales (~4.13 bits a weight)."""
    return int(shape.linear_params * (NF4_BYTES + NF4_STATE_BYTES))


def activation_bytes(method: str, weight_dtype: str, compute_dtype: str | None = None) -> int:
    """Bytes per element of what a pass keeps for backward: the compute dtype (a full fine-tune's autocast dtype, else
    the weights'); over a 4-bit base (QLoRA/QDoRA) the dtype of its unquantized rest (`quantized_rest_dtype`): fp32
    norms and embeddings make the residual stream and every layer's input fp32, whatever the 4-bit matmuls compute
    in (traced: tests/unit/training/test_memory.py)."""
    from ayar.models.adapters import quantized_rest_dtype

    if method in QUANTIZED:
        return _BYTES[quantized_rest_dtype(weight_dtype)]
    return _BYTES[compute_dtype or weight_dtype]


def plan_trainer_memory(
    shape: Shape,
    *,
    weight_dtype: str,
    device: str,
    rows: int,
    row_len: int,
    trained: int,
    head: str,
    method: str = "lora",
    available: int | None = None,
    dropout: bool = True,
    checkpointing: bool = False,
) -> MemoryPlan:
    """A Trainer stage's peak (training/trl_stage.py): one forward and backward of the micro-batch's `rows` rows, each
    padded to `row_len`, through transformers + peft modules, then its `head`. The same terms as ayar's own loop for
    weights, states, activations and runtime; DPO's reference pass runs under no_grad before the policy's and keeps
    nothing, so it adds no term."""
    from ayar.kernels import trl_head

    tokens = rows * row_len
    plan = plan_memory(
        shape, weight_dtype=weight_dtype, device=device, tokens=tokens, trained=trained, method=method,
        available=available, rows=rows, dropout=dropout, checkpointing=checkpointing, chunked_logits=False,
        long_share=1.0,
    )  # fmt: skip
    positions = rows * max(row_len - 1, 0)
    if head == "fused":  # every position scored (a GPU scores the trained ones: this over-counts there)
        del plan.parts["logits (trained tokens)"]
        fused = trl_head.scratch_bytes(positions, shape.vocab, device) + positions * shape.hidden * 4
        if checkpointing:  # its backward runs, and frees its scratch, before the first layer is recomputed: the
            # peak holds the larger of the two
            inputs = tokens * shape.layers * shape.hidden * activation_bytes(method, weight_dtype)
            fused = max(0, fused - (plan.parts["activations"] - inputs) - plan.parts.get("attention scratch", 0))
        plan.parts["fused head (TRL)"] = fused
    elif head == "logits":
        plan.parts["logits (trained tokens)"] = tokens * shape.vocab * 4 * FULL_LOGITS_COPIES
    else:
        del plan.parts["logits (trained tokens)"]
    plan.parts["runtime"] += TRL_RUNTIME_BYTES
    return plan


def zero3_linear_inputs(
    shape: Shape, tokens: int, weight_dtype: str, dropout: bool, checkpointing: bool, method: str = "lora"
) -> int:
    """What ZeRO-3 adds to a pass's activations: DeepSpeed runs every linear layer through its own autograd function,
    which keeps the layer's input for backward even where the weight is frozen. Without LoRA dropout the adapters
    keep their layers' very inputs, and only unwrapped layers' inputs are added; with it they keep dropped-out copies,
    and every frozen layer's input is kept besides (in a half dtype but a wrapped attention output projection's, which
    its adapter keeps anyway: `layer_bytes_per_token`). A full fine-tune keeps them all anyway. With gradient
    checkpointing, one layer's at a time (as its activations). Traced: tests/unit/training/test_memory.py."""
    if method == "full" or method in QUANTIZED:  # a 4-bit layer computes in bitsandbytes' own function, not F.linear
        return 0
    half = _BYTES[weight_dtype] < 4
    kept = shape.linear_distinct_inputs - (
        (shape.lora_attention_out if half else 0) if dropout else shape.lora_distinct_inputs
    )
    layers = 2 if checkpointing else shape.layers
    return tokens * layers * kept * _BYTES[weight_dtype]


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


def cpu_memory_per_process(processes: int) -> int:
    """This machine's available RAM split evenly among `processes` running on it: they share it."""
    return available_memory("cpu") // processes


def largest_pass(examples, batch_size: int, packed: bool, per_pass: int = 0) -> Pass:
    """The longest pass: the longest examples together (batch_size of them, or per_pass when a micro-batch runs in
    passes), in one padding-free row or padded to the longest."""
    n = per_pass if 0 < per_pass < batch_size else batch_size
    return _pass(sorted(examples, key=lambda e: len(e.input_ids), reverse=True)[:n], packed)


def _pass(chosen, packed: bool, share_prefix: bool = False) -> Pass:
    if not chosen:
        return Pass(0, 0, 1)
    trained = sum(e.n_trained for e in chosen)
    prefix = _opening(chosen) if share_prefix else 0
    lengths = tuple(sorted((len(e.input_ids) - prefix for e in chosen), reverse=True))
    if packed:
        return Pass(prefix + sum(lengths), trained, 1, lengths, prefix)
    return Pass(lengths[0] * len(chosen), trained, len(chosen), lengths)


def _opening(examples) -> int:
    """The opening collate's `share_prefix` would compute once for these examples (0: none)."""
    from ayar.data.collate import MIN_SHARED_PREFIX, shared_prefix_length

    n = shared_prefix_length(examples)
    return n if n >= MIN_SHARED_PREFIX else 0


def candidate_passes(examples, batch_size: int, per_pass: int = 0, share_prefix: bool = False) -> list[Pass]:
    """Padding-free passes that may hold the most under per-example attention on CPU, where a segment up to
    MATMUL_MAX_LEN keeps its attention probabilities (~L^2 per example) and a longer one keeps none: the longest
    examples are not the worst then (measured: benchmarks/README.md, "memory planner"). What a pass keeps grows with
    each example's length on either side of that bound, so the worst pass is, for some j, the j longest long examples
    with the longest short ones: one candidate per j. `share_prefix` (the fused decoder): an example is short when
    what follows the opening all examples share is (a pass's own opening can only be longer)."""
    from ayar.kernels.varlen import MATMUL_MAX_LEN

    n = per_pass if 0 < per_pass < batch_size else batch_size
    ordered = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)
    opening = _opening(ordered) if share_prefix else 0
    long = [e for e in ordered if len(e.input_ids) - opening > MATMUL_MAX_LEN][:n]
    short = [e for e in ordered if len(e.input_ids) - opening <= MATMUL_MAX_LEN][:n]
    out = [
        _pass(long[:j] + short[: n - j], True, share_prefix)
        for j in range(n + 1)
        if j <= len(long) and n - j <= len(short)
    ]
    return out or [_pass(long + short, True, share_prefix)]  # fewer examples than a pass takes: all of them


def plan_layout(
    shape: Shape,
    cfg,
    examples,
    weight_dtype: str,
    device: str,
    layout: Layout,
    available: int | None = None,
    batch_size: int | None = None,
    per_pass: int | None = None,
    sharding: Sharding | None = None,
    compute_dtype: str | None = None,
) -> MemoryPlan:
    """The plan of ayar's own loop for `layout` over `examples`: its heaviest pass (`candidate_passes`), per rank under
    `sharding`; `compute_dtype`: a full fine-tune's autocast dtype (`plan_memory`)."""
    batch = batch_size or cfg.training.batch_size
    rows = layout.per_pass if per_pass is None else per_pass
    varlen = layout.packed and device == "cpu" and shape.plain_attention
    # the chunked cross-entropy needs a plain frozen head and the built-in loss (training/loss.py)
    chunked = (
        shape.plain_head
        and not cfg.training.loss
        and cfg.method != "full"
        and not any("lm_head" in m or "embed" in m for m in (cfg.lora.modules_to_save or []))
    )

    def plan_of(p: Pass) -> MemoryPlan:
        return plan_memory(
            shape,
            weight_dtype=weight_dtype,
            device=device,
            tokens=p.tokens,
            trained=p.trained,
            method=cfg.method,
            available=available,
            rows=p.rows,
            dropout=cfg.lora.dropout > 0,
            fused=layout.fused,
            attention_keys=p.attention_keys(layout.fused) if varlen else 0.0,
            checkpointing=layout.checkpointing,
            long_share=p.long_share() if varlen else 1.0,
            packed=layout.packed,
            chunked_logits=chunked,
            opening_copies=p.opening_copies() if varlen else (0.0, 0.0),
            compute_dtype=compute_dtype,
            one_pass_steps=(not rows or rows >= batch) and cfg.training.grad_accum == 1,
        )

    candidates = (
        candidate_passes(examples, batch, rows, share_prefix=layout.fused)
        if varlen
        else [largest_pass(examples, batch, layout.packed, rows)]
    )
    plan, heaviest = max(((plan_of(p), p) for p in candidates), key=lambda planned: planned[0].total)
    plan.heaviest = heaviest
    if not sharding:
        return plan
    kept = zero3_linear_inputs(
        shape, heaviest.tokens, weight_dtype, cfg.lora.dropout > 0, layout.checkpointing, cfg.method
    )
    return per_rank(plan, shape, sharding, kept, cfg.method in QUANTIZED)


def suggestions(
    shape: Shape,
    cfg,
    examples,
    weight_dtype: str,
    device: str,
    available: int,
    layout: Layout,
    sharding=None,
    compute_dtype: str | None = None,
) -> list[str]:
    """Settings that would fit, each changing one thing (the effective batch is kept where possible)."""
    import dataclasses

    shard = {"sharding": sharding, "compute_dtype": compute_dtype}
    fits = lambda **kw: (
        plan_layout(shape, cfg, examples, weight_dtype, device, kw.pop("layout", layout), available, **shard, **kw).fits
    )
    out = []
    if not layout.checkpointing and fits(layout=dataclasses.replace(layout, checkpointing=True)):
        out.append("training.gradient_checkpointing=true (recomputes each layer's forward in backward: ~30% slower)")
    for rpp in (2, 1):
        if layout.per_pass and layout.per_pass <= rpp or cfg.training.batch_size <= rpp:
            continue
        if fits(per_pass=rpp):
            out.append(f"training.rows_per_pass={rpp} (same batches and gradient, in smaller passes)")
            break
    bs, ga = cfg.training.batch_size, cfg.training.grad_accum
    b = bs
    while b > 1:
        b //= 2
        if fits(batch_size=b):
            out.append(f"training.batch_size={b} training.grad_accum={ga * bs // b} (same effective batch)")
            break
    for max_len in (cfg.data.max_length // 2, cfg.data.max_length // 4):
        if (
            max_len >= 64
            and plan_layout(
                shape, cfg, [_Clip(e, max_len) for e in examples], weight_dtype, device, layout, available, **shard
            ).fits
        ):
            out.append(f"data.max_length={max_len} (longer rows are truncated)")
            break
    if (compute_dtype or weight_dtype) == "float32":
        out.append("model.dtype=bfloat16 (halves weights and activations; on CPU only fast with AVX512-BF16/AMX)")
    return out


class _Clip:
    def __init__(self, e, n):
        self.input_ids = e.input_ids[:n]
        self.labels = e.labels[:n]
        self.n_trained = min(e.n_trained, n)
