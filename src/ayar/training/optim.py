"""The one place `training.*` becomes an optimizer and a learning-rate schedule: built here for ayar's own
loop (SFT), and translated here into TrainingArguments fields for the stages that run on a transformers /
TRL Trainer, so both read the same settings the same way."""

from __future__ import annotations

import torch


def trainer_optimizer_args(tcfg) -> dict:
    """The optimizer and schedule settings as transformers TrainingArguments fields."""
    return dict(
        learning_rate=tcfg.learning_rate,
        lr_scheduler_type=tcfg.lr_scheduler,
        warmup_steps=tcfg.warmup_ratio,
        weight_decay=tcfg.weight_decay,
        max_grad_norm=tcfg.max_grad_norm if tcfg.max_grad_norm > 0 else 0.0,
        optim="adamw_torch" if tcfg.optimizer == "adamw" else "adamw_bnb_8bit",
    )


def build_optimizer(model, tcfg, warn=print, cpu_adam: bool = False):
    """AdamW over the trained weights (LoRA+: two groups; adamw_8bit: bitsandbytes' on CUDA). `cpu_adam`
    (RunPlan.cpu_adam: DeepSpeed with offload) makes it DeepSpeed's CPU Adam, the one optimizer DeepSpeed steps
    offloaded states with: the same AdamW update, vectorised in C++."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cpu_adam:
        return _cpu_adam(model, params, tcfg)
    opt = None
    if tcfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb

            if torch.cuda.is_available():
                opt = bnb.optim.AdamW8bit(params, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
        except ImportError:
            pass
        if opt is None:
            warn("training.optimizer: adamw_8bit needs bitsandbytes on CUDA; using torch AdamW instead")
    fused = fused_adamw(params)
    if opt is None and tcfg.loraplus_lr_ratio:
        from peft.optimizers import create_loraplus_optimizer

        # LoRA+: the same AdamW, with the B matrices in a group whose learning rate is `ratio` times higher
        opt = create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=tcfg.learning_rate,
            loraplus_lr_ratio=tcfg.loraplus_lr_ratio,
            weight_decay=tcfg.weight_decay,
            fused=fused,
        )
    if opt is None:
        opt = torch.optim.AdamW(params, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay, fused=fused)
    return opt


def _cpu_adam(model, params, tcfg):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from ayar.errors import AyarError

    def adam(groups, **kwargs):  # DeepSpeed compiles its C++ op the first time (about a minute) and caches it
        try:
            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        except Exception as e:  # a missing compiler, ninja or headers, as DeepSpeed's builder reports it
            raise AyarError(
                f"distributed.offload under DeepSpeed steps the optimizer with DeepSpeed's CPU Adam, which could not "
                f"be built here ({type(e).__name__}: {e}); install a C++ compiler and ninja (or a DeepSpeed built "
                "with DS_BUILD_CPU_ADAM=1), or drop distributed.offload"
            ) from None

    if tcfg.loraplus_lr_ratio:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model, adam, lr=tcfg.learning_rate, loraplus_lr_ratio=tcfg.loraplus_lr_ratio,
            weight_decay=tcfg.weight_decay,
        )  # fmt: skip
    return adam(params, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)


def fused_adamw(params) -> bool | None:
    """torch's fused AdamW (one kernel over all parameters) where it runs: CPU and CUDA floating-point
    parameters. On a LoRA of a 135M model it took 8 ms a step against 25 ms for the default (foreach)
    implementation on a 2-core CPU; the same update, rounded in a different order."""
    ok = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    # None, not False, where it does not run: torch reads fused=False as a choice and then turns off its
    # foreach default too, leaving the slowest (per-tensor) loop
    return True if ok and params else None


def build_scheduler(optimizer, tcfg, total_steps: int):
    from transformers import get_scheduler

    warmup = int(round(tcfg.warmup_ratio * total_steps))
    return get_scheduler(tcfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
