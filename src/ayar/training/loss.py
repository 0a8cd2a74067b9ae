"""Causal-LM loss over trained positions only.

The LM head runs only on positions whose next token is trained, so the full-vocabulary logits of
prompt and padding positions (most of a chat batch) are never materialised, and those of trained
positions are taken a chunk at a time (kernels/ops.linear_cross_entropy). Packed rows carrying
`cu_seq_lens` get per-example attention where the model allows it (kernels/varlen.py), and with `fused` run
through ayar's fused decoder (kernels/fused_decoder.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ayar.data.render import IGNORE
from ayar.kernels import base_model, fused_decoder, varlen
from ayar.kernels.ops import linear_cross_entropy


@contextlib.contextmanager
def compute_context(model, autocast=None):
    """`autocast` (the run plan's, for full fine-tuning: fp32 master weights, bf16/fp16 compute): run under it.
    bf16/fp16 base weights with fp32 adapter weights: run the adapters' matmuls in the base dtype under
    autocast (their fp32 master weights and optimizer stay fp32), instead of peft's default of copying
    every adapter input to fp32 and multiplying in fp32. Measured in benchmarks/README.md."""
    base = base_model(model)
    device = next(base.parameters()).device.type
    dtype = next(base.parameters()).dtype
    if autocast is not None:
        with torch.autocast(device, dtype=autocast):
            yield
    elif dtype in (torch.bfloat16, torch.float16) and hasattr(model, "peft_config"):
        from peft.helpers import disable_input_dtype_casting

        with torch.autocast(device, dtype=dtype), disable_input_dtype_casting(model):
            yield
    else:
        yield


def loss_sum(model, batch: dict, loss_fn=None, fused: bool = False, autocast=None) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over trained positions, and how many there are. `loss_fn(logits, targets)`
    -> per-position losses replaces cross-entropy (`training.loss`). `fused`: packed rows go through the
    fused decoder (the caller checked `fused_decoder.usable`)."""
    with compute_context(model, autocast):
        return _loss_sum(model, batch, loss_fn, fused)


def _hidden(model, batch: dict, fused: bool) -> torch.Tensor:
    base = base_model(model)
    if fused and "cu_seq_lens" in batch:
        return fused_decoder.hidden_states(
            model, batch["input_ids"], batch["position_ids"], batch["cu_seq_lens"], int(batch.get("shared_prefix", 0))
        )
    if "shared_prefix" in batch:
        raise ValueError("a row with a shared prefix needs the fused decoder (collate share_prefix only with fused)")
    attention, segments = contextlib.nullcontext(), {}
    if varlen.routes(base.config, batch):
        attention, segments = varlen.varlen_attention(base), {"cu_seq_lens_q": batch["cu_seq_lens"]}
    with attention:
        out = base.get_decoder()(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
            **segments,
        )
    return out.last_hidden_state


def _loss_sum(model, batch: dict, loss_fn=None, fused: bool = False) -> tuple[torch.Tensor, int]:
    base = base_model(model)
    hidden = _hidden(model, batch, fused)[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    head = base.get_output_embeddings()
    cap = getattr(base.config, "final_logit_softcapping", None)
    if (
        loss_fn is None
        and not cap
        and type(head) is torch.nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
    ):
        # the usual case: chunked, never holding [trained positions, vocab] logits (kernels/ops.py)
        h = hidden[keep]
        if torch.is_autocast_enabled(h.device.type):
            h = h.to(torch.get_autocast_dtype(h.device.type))
        return linear_cross_entropy(h, head.weight.to(h.dtype), targets[keep]), int(keep.sum())
    logits = head(hidden[keep]).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    if loss_fn is not None:
        return custom_loss(loss_fn, logits, targets[keep]).sum(), int(keep.sum())
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())


def custom_loss(loss_fn, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Call a `training.loss` function and check it keeps its contract (one finite-able loss per position)."""
    from ayar.errors import AyarError

    losses = loss_fn(logits, targets)
    if not isinstance(losses, torch.Tensor) or losses.shape != targets.shape:
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise AyarError(
            f"training.loss must return one loss per trained position, a tensor of shape {tuple(targets.shape)}; "
            f"got {got}"
        )
    return losses


def reference_loss(model, batch: dict) -> torch.Tensor:
    """The plain way (full logits, mean over trained tokens): what loss_sum must agree with."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids")
    ).logits.float()
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE
    )


class WithLoss(torch.nn.Module):
    """The model with its loss in the forward, for engines that make a weight whole only inside a module's forward
    (FSDP's root unit, training/sharding.py; DeepSpeed ZeRO-3, training/zero.py): the loss reads the head's weight
    itself (never the full logits), outside the head's own forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, loss_fn=None, fused: bool = False, autocast=None):
        return loss_sum(self.model, batch, loss_fn, fused, autocast)
