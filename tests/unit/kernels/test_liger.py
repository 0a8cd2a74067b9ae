"""Liger's kernels (kernels/liger.py): when they apply, and what Liger is asked to patch. Liger's Triton kernels
need a GPU; that they run there is not tested here."""

import sys
import types

from ayar.kernels import liger


def test_liger_applies_on_cuda_when_installed_only():
    assert liger.applies("cuda", is_installed=True) and liger.applies("cuda:1", is_installed=True)
    assert not liger.applies("cuda", is_installed=False)
    assert not liger.applies("cpu", is_installed=True)


def test_the_plan_on_a_cpu_leaves_liger_out(monkeypatch):
    from ayar.config import load_config
    from ayar.training.plan import decide

    monkeypatch.setattr(liger, "installed", lambda: True)
    assert decide(load_config(None, ["model.device=cpu"])).liger is False


def test_liger_patches_the_transformers_model_under_peft_and_leaves_the_loss_to_ayar(monkeypatch):
    from peft import LoraConfig, get_peft_model

    from tests.helpers import make_model, make_tokenizer

    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = lambda **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    model = make_model("llama", make_tokenizer("llama"))
    liger.apply(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])))
    assert len(calls) == 1 and calls[0]["model"] is model  # the transformers model, not the peft wrapper
    assert calls[0]["cross_entropy"] is False and calls[0]["fused_linear_cross_entropy"] is False
