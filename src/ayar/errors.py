"""User-facing errors: the CLI prints their message (what happened, how to fix it), never a traceback."""


class AyarError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it."""


class ConfigError(AyarError):
    """A config file or override is invalid."""


class DataError(AyarError):
    """A data file or row is invalid; the message names the file and line."""


class ModelError(AyarError):
    """A model or tokenizer could not be loaded."""


class SaidElsewhere(AyarError):
    """Another process of the same run (rank 0) met the error and printed it; this one ends without repeating it."""
