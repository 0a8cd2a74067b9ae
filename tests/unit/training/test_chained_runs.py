"""A run chained from an earlier run (DPO after SFT) trains on the base with the earlier adapter merged in
memory. Its adapter/ must load with plain peft onto the base named in adapter_config.json and give the run's
model: the adapters stacked into one (exact for LoRA), or, where that is not exact (DoRA), the start model
saved beside it."""

import json

import pytest
import torch

from ayar.infer.load import load_engine
from ayar.training.dispatch import train
from tests.helpers import write_jsonl
from tests.unit.training.test_stages import PAIRS, config

QUIET = dict(log=lambda *_: None)
PROMPT = "What is 7 plus 5?"


def plain_peft_logits(adapter, ids):
    """What a user without ayar gets: the base named in adapter_config.json, the adapter on top."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def run_logits(run, ids):
    engine = load_engine(run, **QUIET)
    with torch.no_grad():
        return engine.model(input_ids=ids).logits, engine


def chain(start, tmp_path, *overrides):
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    # a high learning rate: the stage's own change must be far larger than the comparison's tolerance
    return train(
        config(
            start,
            data,
            tmp_path / "runs",
            "stage=dpo",
            "training.max_steps=3",
            "training.learning_rate=0.05",
            *overrides,
        )
    ).path


def test_a_dpo_run_after_sft_loads_with_plain_peft_onto_the_base(tiny_run, tiny_model_dir, tmp_path):
    run = chain(tiny_run, tmp_path)
    meta = json.loads((run / "run.json").read_text())
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    sft_rank = json.loads((tiny_run / "adapter" / "adapter_config.json").read_text())["r"]
    assert meta["adapter"]["applies_to"] == adapter_cfg["base_model_name_or_path"] == meta["base_model"]
    assert adapter_cfg["r"] == sft_rank + json.loads((run / "stage_adapter" / "adapter_config.json").read_text())["r"]
    assert (run / "adapter" / "tokenizer_config.json").is_file()

    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 8]])
    expected, engine = run_logits(run, ids)
    torch.testing.assert_close(plain_peft_logits(run / "adapter", ids), expected, atol=1e-4, rtol=1e-4)
    # the test can fail: the SFT adapter alone (what plain peft used to load from such a run) is far off
    sft_only = plain_peft_logits(tiny_run / "adapter", ids)
    assert (sft_only - expected).abs().max() > 1e-2
    # ayar's own view is unchanged: the adapter-off model is the SFT model the DPO run started from
    with torch.no_grad(), engine.base_model():
        torch.testing.assert_close(engine.model(input_ids=ids).logits, sft_only, atol=1e-4, rtol=1e-4)
    assert "applies to" in (run / "README.md").read_text()

    # a third stage from the DPO run stacks all three
    (tmp_path / "third").mkdir()
    third = chain(run, tmp_path / "third")
    assert json.loads((third / "run.json").read_text())["adapter"]["stacked"][:2] == [
        str((tiny_run / "adapter").resolve()),
        str((run / "stage_adapter").resolve()),
    ]
    torch.testing.assert_close(
        plain_peft_logits(third / "adapter", ids), run_logits(third, ids)[0], atol=1e-4, rtol=1e-4
    )


def test_a_dora_stage_after_sft_saves_the_model_it_starts_from(tiny_run, tmp_path):
    run = chain(tiny_run, tmp_path, "method=dora")
    meta = json.loads((run / "run.json").read_text())
    assert "DoRA" in meta["adapter"]["not_stacked"]
    assert meta["adapter"]["applies_to"] == str((run / "start_model").resolve())
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 8]])
    torch.testing.assert_close(plain_peft_logits(run / "adapter", ids), run_logits(run, ids)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rslora", [True, False])
def test_stacking_is_exact_for_rslora_and_uneven_targets(tiny_model_dir, tmp_path, rslora):
    """stack_adapters on its own: two adapters of different ranks and modules, merged in order == stacked."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from ayar.models.adapters import stack_adapters, stackable

    def random_adapter(name, r, modules, seed):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            LoraConfig(r=r, lora_alpha=2 * r, target_modules=modules, use_rslora=rslora, init_lora_weights=False),
        )
        model.save_pretrained(tmp_path / name)
        return str(tmp_path / name), model

    first, _ = random_adapter("a", 4, ["q_proj", "v_proj"], 0)
    second, model = random_adapter("b", 2, ["v_proj", "o_proj", "up_proj"], 1)
    assert stackable([first, second]) is None
    stack_adapters(model, [first, second], tmp_path / "stacked", str(tiny_model_dir))
    assert list(model.peft_config) == ["default"]  # the extra adapters are gone again

    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    merged = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for path in (first, second):
        merged = PeftModel.from_pretrained(merged, path).merge_and_unload()
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
    torch.testing.assert_close(plain_peft_logits(tmp_path / "stacked", ids), expected, atol=1e-4, rtol=1e-4)


def test_the_server_answers_a_chained_run_as_an_adapter_per_request(tiny_run, tmp_path):
    """`ayar serve <SFT run> --adapter dpo=<DPO run>`: the DPO run's adapter goes on the same base as the SFT
    run's; before it was stacked, the DPO-only delta answered there (the SFT half missing)."""
    from ayar.serve.backend import HFBackend

    dpo = chain(tiny_run, tmp_path)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 8]])
    backend = HFBackend(load_engine(tiny_run, **QUIET), "sft")
    for name, folder in (("dpo", dpo), ("delta", dpo / "stage_adapter")):
        backend.load_adapter(name, folder)
    with backend.lock, torch.no_grad():
        served = {}
        for name in ("dpo", "delta"):
            backend.model.set_adapter(name)
            served[name] = backend.model(input_ids=ids).logits
        backend.model.set_adapter("default")
    expected = run_logits(dpo, ids)[0]
    torch.testing.assert_close(served["dpo"], expected, atol=1e-4, rtol=1e-4)
    assert (served["delta"] - expected).abs().max() > 1e-2  # what the test would catch
