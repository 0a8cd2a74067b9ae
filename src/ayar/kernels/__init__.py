"""ayar's own CPU training kernels: the fused LoRA decoder, per-example (packed) attention, the chunked
cross-entropy, hashed dropout and the compiled pointwise loops under them. They import torch and each
other only: `models/` and `train/` call into them, never the reverse."""


def base_model(model):
    """The transformers model itself, under the peft wrapper `apply_method` may have put around it."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
