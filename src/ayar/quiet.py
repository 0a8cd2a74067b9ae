"""Silence third-party progress bars and deprecation chatter; ayar prints its own progress and messages."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Our own progress and messages replace the libraries' per-file bars and deprecation chatter."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes' CPU backend warns at import that an optional hub-downloaded kernel is missing; its own
    # kernels run without it
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()  # per-map bars of TRL's dataset preparation
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def name_deepspeed_accelerator(device: str) -> None:
    """Where DeepSpeed is installed, transformers and TRL import it, and it guesses its accelerator at import with a
    warning on every run without a GPU: tell it which one (a user's own DS_ACCELERATOR is kept)."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.startswith("cuda") else "cpu")
