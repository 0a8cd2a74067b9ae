"""DeepSpeed ZeRO for the Trainer-based stages (`distributed.strategy: deepspeed`; DPO family, reward, GRPO,
classification): ayar writes the DeepSpeed config from the run's own settings and hands it to transformers'
TrainingArguments (`deepspeed=`), whose accelerate DeepSpeed plugin starts the engine. Every value is concrete
(no "auto"), so the file is also what `deepspeed` itself reads: DeepSpeed's own config class accepts it (tested).

Stage 2 splits gradients and optimizer states across the processes, stage 3 the weights too; `offload` keeps
optimizer states (and, stage 3, weights) in CPU RAM (GPUs; on a CPU they are there already).
"""

from __future__ import annotations

import torch


def deepspeed_config(cfg, plan) -> dict:
    """The DeepSpeed config of a run: its batch, accumulation, clipping, precision and the ZeRO stage asked for."""
    t, d = cfg.training, cfg.distributed
    zero: dict = {
        "stage": d.zero_stage,
        "overlap_comm": plan.device.startswith("cuda"),
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
    }
    if d.zero_stage == 3:
        # the whole model gathered on rank 0 when saving: the adapter / model is written as one file, not split
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if d.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if d.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * plan.world_size,
        "gradient_clipping": t.max_grad_norm if t.max_grad_norm > 0 else 0.0,
        "bf16": {"enabled": plan.placement.dtype == torch.bfloat16},
        "fp16": {"enabled": plan.placement.dtype == torch.float16},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # progress and metrics are ayar's (metrics.jsonl), not DeepSpeed's log lines
        "wall_clock_breakdown": False,
    }


def trained_state(model) -> dict:
    """ZeRO-3: the trained weights gathered whole from their parts (collective: every rank calls it), named as in
    the model's state_dict, for `save_pretrained(state_dict=...)`; the model's own weights stay split."""
    import deepspeed

    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in trained], modifier_rank=None):
        return {n: p.detach().cpu().clone() for n, p in trained}
