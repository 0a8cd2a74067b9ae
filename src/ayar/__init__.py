"""ayar: fine-tune a pretrained language model on your own data, on the hardware you have."""

import os as _os

from ayar.version import __version__

# torch's CPU matmuls in bf16/fp16 run through oneDNN, which keeps a compiled primitive per matmul shape in
# two caches of up to 1,024 entries each (~0.5 MB an entry). Padding-free training meets new shapes every
# pass: a bf16 run of the default model grew ~36 MB per pass (+870 MB of peak RSS over 10 steps). 128 holds
# a pass's shapes (~45) with room to spare. Read at torch's first oneDNN matmul; a setting of the user's wins.
for _var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    _os.environ.setdefault(_var, "128")

# `ayar.config`, `ayar.data`, `ayar.eval`, `ayar.serve` are subpackages: the API's names avoid them (the data
# functions are `ayar.lint`, `ayar.preview`, `ayar.clean`, `ayar.convert`)
_API = {
    "Run", "Plan", "Cleaned", "configure", "create_app", "evaluate", "export", "load", "plan", "train",
    "lint", "preview", "clean", "convert", "rlaif", "judge_agreement",
}  # fmt: skip
__all__ = ["__version__", *sorted(_API)]


def __getattr__(name):
    """The Python API (ayar/api.py), imported on first use so that `import ayar` stays light."""
    if name in _API:
        from ayar import api

        return getattr(api, name)
    raise AttributeError(f"module 'ayar' has no attribute {name!r}")
