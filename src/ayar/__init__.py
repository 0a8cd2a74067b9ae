"""ayar: fine-tune a pretrained language model on your own data, on the hardware you have."""

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(source, **kwargs):
    """A model ready to answer: a run directory, a merged export, a local model directory or `default`.

        >>> import ayar
        >>> ayar.load("runs/quickstart-20261125-101500").generate("What is 12 * 7?").text
    """
    from ayar.infer.engine import load_engine

    return load_engine(source, **kwargs)
