"""ayar: fine-tune a pretrained language model on your own data, on the hardware you have."""

__version__ = "0.1.0"

__all__ = ["__version__"]
