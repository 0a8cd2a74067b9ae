"""Issue 5: PiSSA/OLoRA, full fine-tuning, custom losses, preference alignment (DPO, IPO, KTO, ORPO, SimPO),
reward models, GRPO and classification, each on a tiny random model: it trains in the right direction and
what it saves loads back."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ayar.config import load_config
from ayar.errors import ConfigError, DataError
from ayar.training.dispatch import train
from tests.helpers import MATH_ROWS, write_jsonl

QUIET = dict(log=lambda *_: None)

PAIRS = [
    {
        "prompt": f"What is {a} plus {b}?",
        "chosen": f"{a} + {b} = {a + b}. #### {a + b}",
        "rejected": f"I do not know, maybe {a * b + 1}.",
    }
    for a, b in [
        (12, 30),
        (7, 5),
        (48, 24),
        (3, 9),
        (10, 11),
        (21, 4),
        (6, 8),
        (15, 27),
        (2, 40),
        (33, 3),
        (1, 2),
        (8, 13),
        (5, 17),
        (9, 9),
        (14, 6),
        (30, 31),
    ]
]

POS = ["great", "wonderful", "fun", "loved", "joyful"]
NEG = ["terrible", "boring", "awful", "slow", "bad"]
# "a <word> and <word> film": the label shows in the words, not in where they sit
LABELLED = [
    {"text": f"a {a} and {b} film", "label": label}
    for label, words in (("pos", POS), ("neg", NEG))
    for a in words
    for b in words
    if a != b
]


def config(model_dir, data, out, *overrides):
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            "model.dtype=float32",
            f"data.train={data}",
            f"output.dir={out}",
            "training.tracker=none",
            "training.batch_size=4",
            "data.val_ratio=0.25",
            "data.cache=false",
            "training.warmup_ratio=0",
            "training.learning_rate=5e-3",
            *overrides,
        ],
    )


def losses(run) -> list[float]:
    return [m["loss"] for m in run.read_metrics() if "loss" in m]


# --- PiSSA / OLoRA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_adapters_are_saved_to_fit_the_original_base(tmp_path, init):
    """PiSSA/OLoRA change the base weights at init; the saved (converted) adapter on the ORIGINAL base must give
    the trained model's outputs."""
    from types import SimpleNamespace

    from peft import PeftModel

    from ayar.models.adapters import apply_method, save_initial, save_trained
    from tests.helpers import make_model, make_tokenizer

    tok = make_tokenizer("qwen2")
    lora = SimpleNamespace(
        r=4,
        alpha=8,
        dropout=0.0,
        target_modules="all-linear",
        rslora=False,
        modules_to_save=None,
        freeze_first_layers=0,
        init=init,
    )
    model = apply_method(make_model("qwen2", tok), "lora", lora)
    base_layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(
        base_layer, make_model("qwen2", tok).model.layers[0].self_attn.q_proj.weight
    )  # residual base
    init_dir = save_initial(model, lora, tmp_path / "init")
    with torch.no_grad():  # stands in for training: move every adapter weight
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    ids = torch.tensor([tok("What is 7 plus 5?")["input_ids"]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    save_trained(model, tmp_path / "adapter", init_dir)
    reloaded = PeftModel.from_pretrained(make_model("qwen2", tok), str(tmp_path / "adapter"))  # the original base
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, atol=2e-4, rtol=1e-4)
        assert not torch.allclose(make_model("qwen2", tok)(input_ids=ids).logits, trained, atol=1e-3)


def test_a_pissa_run_trains_and_its_run_directory_loads(tiny_model_dir, tmp_path):
    from ayar.infer.load import load_engine

    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    run = train(config(tiny_model_dir, data, tmp_path / "runs", "training.max_steps=8", "lora.init=pissa"))
    assert losses(run)[-1] < losses(run)[0]
    adapter_cfg = json.loads((run.adapter / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 2 * 16  # converted: the difference to the initial adapter, rank 2r
    reply = load_engine(run.path, **QUIET).generate("What is 7 plus 5?", max_new_tokens=4)
    assert reply.new_tokens > 0


# --- full fine-tuning ------------------------------------------------------------------------------


def test_full_fine_tuning_trains_every_weight_and_resumes_exactly(tiny_model_dir, tmp_path):
    from ayar.infer.load import load_engine
    from ayar.training.sft import train_sft

    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    kw = ["method=full", "training.max_steps=4", "training.learning_rate=1e-3", "training.save_steps=2"]
    run = train(config(tiny_model_dir, data, tmp_path / "a", *kw))
    assert losses(run)[-1] < losses(run)[0]
    meta = json.loads(run.meta.read_text())
    assert meta["params"]["trainable"] == meta["params"]["total"] and meta["method"] == "full"
    assert (run.full_model / "model.safetensors").is_file() and not run.adapter.exists()

    def stop_at_3(state):
        if state.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sft(config(tiny_model_dir, data, tmp_path / "b", *kw), callbacks=[stop_at_3])
    resumed = train(resume=next((tmp_path / "b").iterdir()))
    assert losses(resumed) == pytest.approx(losses(run), rel=1e-5)

    engine = load_engine(run.path, **QUIET)
    assert engine.full_finetune and not hasattr(engine.model, "peft_config")
    from ayar.serve.backend import HFBackend

    served = HFBackend(engine, "tuned")  # served under the run's name: there is no separate base to offer
    assert served.model_names() == ["tuned"] and served.default_model == "tuned"
    ids = engine.tok("What is 7 plus 5?", return_tensors="pt")["input_ids"]
    base = load_engine(str(tiny_model_dir), dtype="float32", **QUIET)
    with torch.no_grad():
        assert not torch.allclose(engine.model(input_ids=ids).logits, base.model(input_ids=ids).logits, atol=1e-4)


# --- custom loss -----------------------------------------------------------------------------------

FOCAL = """
import torch.nn.functional as F

def focal(logits, targets, gamma=2.0):
    ce = F.cross_entropy(logits, targets, reduction="none")
    return (1 - (-ce).exp()) ** gamma * ce

def wrong_shape(logits, targets):
    return F.cross_entropy(logits, targets)
"""


def test_a_custom_loss_by_path_is_what_training_minimizes(tiny_model_dir, tmp_path):
    import torch.nn.functional as F

    from ayar.data.collate import collate
    from ayar.plugins import load_callable
    from ayar.training.loss import loss_sum
    from tests.helpers import examples, make_model, make_tokenizer

    (tmp_path / "losses.py").write_text(FOCAL)
    focal = load_callable(f"{tmp_path / 'losses.py'}:focal", "training.loss")
    tok = make_tokenizer("qwen2")
    model, batch = make_model("qwen2", tok), collate(examples(make_tokenizer("qwen2"))[:4], tok.pad_token_id)
    got, n = loss_sum(model, batch, focal)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    ce = F.cross_entropy(logits[keep].float(), targets[keep], reduction="none")
    want = ((1 - (-ce).exp()) ** 2 * ce).sum()
    assert float(got) == pytest.approx(float(want), rel=1e-4) and float(got) < float(ce.sum())

    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    run = train(
        config(
            tiny_model_dir,
            data,
            tmp_path / "runs",
            "training.max_steps=6",
            f"training.loss={tmp_path / 'losses.py'}:focal",
        )
    )
    assert losses(run)[-1] < losses(run)[0]
    with pytest.raises(Exception, match="one loss per trained position"):
        train(
            config(
                tiny_model_dir,
                data,
                tmp_path / "runs",
                "training.max_steps=1",
                f"training.loss={tmp_path / 'losses.py'}:wrong_shape",
            )
        )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nocolon", "module:function"),
        ("no_such_module_xyz:f", "cannot import"),
        ("json:no_such_function", "has no function 'no_such_function'"),
        ("/nope/losses.py:f", "not found"),
    ],
)
def test_a_bad_custom_loss_names_the_field_and_the_fix(spec, message):
    from ayar.plugins import load_callable

    with pytest.raises(ConfigError, match=f"training.loss.*{message}"):
        load_callable(spec, "training.loss")


# --- preference alignment ----------------------------------------------------------------------------


def _margin(engine, pairs) -> float:
    """Mean log-prob margin, chosen minus rejected answer, under the engine's model."""
    from ayar.data.records import Record
    from ayar.eval.runner import _logp

    total = 0.0
    for p in pairs:
        prompt = Record([{"role": "user", "content": p["prompt"]}])
        total += _logp(engine, prompt, [{"role": "assistant", "content": p["chosen"]}])
        total -= _logp(engine, prompt, [{"role": "assistant", "content": p["rejected"]}])
    return total / len(pairs)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "kto", "orpo", "simpo"])
def test_preference_losses_raise_the_chosen_over_the_rejected(tiny_model_dir, tmp_path, loss):
    from ayar.infer.load import load_engine

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    run = train(
        config(tiny_model_dir, data, tmp_path / "runs", "stage=dpo", f"preference.loss={loss}", "training.max_steps=8")
    )
    records = run.read_metrics()
    assert losses(run)[-1] < losses(run)[0], losses(run)
    if loss != "kto":  # TRL logs the pairwise margin and accuracy; KTO scores answers one at a time
        assert any("eval_preference_accuracy" in r for r in records) and "reward_margin" in records[0]
    engine = load_engine(run.path, **QUIET)  # round trip: base + the saved adapter
    tuned = _margin(engine, PAIRS)
    with engine.base_model():  # the reference: the same weights with the adapter disabled
        before = _margin(engine, PAIRS)
    assert tuned > before + 1.0, (before, tuned)
    if loss == "dpo":  # `ayar eval` on held-out pairs reports the shift against the adapter-disabled model
        from ayar.config import EvalConfig
        from ayar.eval.runner import evaluate_run

        held_out = write_jsonl(
            tmp_path / "h.jsonl", [{**p, "prompt": p["prompt"].replace("plus", "added to")} for p in PAIRS]
        )
        result = evaluate_run(
            EvalConfig(run=str(run.path), data=str(held_out), anchor=None, out=str(tmp_path / "eval"))
        )
        shift = result.checks["preference_shift"]
        assert shift["implicit_accuracy"] >= 0.9 and shift["implicit_margin"] > 1, shift
        assert "implicit-reward accuracy" in (tmp_path / "eval" / "report.md").read_text()


def test_dpo_from_an_sft_run_uses_the_sft_model_as_reference(tiny_run, tmp_path):
    from ayar.infer.load import load_engine

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    run = train(config(tiny_run, data, tmp_path / "runs", "stage=dpo", "training.max_steps=2"))
    meta = json.loads(run.meta.read_text())
    assert meta["merged_adapters"] == [str((tiny_run / "adapter").resolve())]
    dpo, sft = load_engine(run.path, **QUIET), load_engine(tiny_run, **QUIET)
    ids = sft.tok("What is 7 plus 5?", return_tensors="pt")["input_ids"]
    with torch.no_grad(), dpo.base_model():
        torch.testing.assert_close(
            dpo.model(input_ids=ids).logits, sft.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )


def test_stages_refuse_data_of_the_wrong_kind_and_bad_combinations(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    with pytest.raises(DataError, match=r"d.jsonl:1: a chat row, but `stage: dpo` trains on preference pairs"):
        train(config(tiny_model_dir, data, tmp_path / "runs", "stage=dpo"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "Hi", "output": ""}] + MATH_ROWS)
    with pytest.raises(DataError, match="bad.jsonl:1: the assistant answer is empty|empty"):
        train(config(tiny_model_dir, bad, tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()  # a config that fails before training leaves no empty run directory
    with pytest.raises(ConfigError, match="lora.init: pissa changes the base weights"):
        train(config(tiny_model_dir, data, tmp_path / "runs", "stage=dpo", "lora.init=pissa"))
    with pytest.raises(ConfigError, match="task: classification trains with stage: sft"):
        train(config(tiny_model_dir, data, tmp_path / "runs", "stage=reward", "task=classification"))
    with pytest.raises(ConfigError, match="method: full is supported for stage: sft"):
        train(config(tiny_model_dir, data, tmp_path / "runs", "stage=grpo", "method=full"))


# --- reward model ------------------------------------------------------------------------------------


def test_reward_model_learns_to_rank_held_out_pairs(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    run = train(config(tiny_model_dir, data, tmp_path / "runs", "stage=reward", "training.max_steps=12"))
    meta = json.loads(run.meta.read_text())
    assert meta["after"]["accuracy"] == 1.0 and meta["after"]["margin"] > meta["before"]["margin"] + 1, meta
    # round trip: the adapter (with its score head) on the base ranks the pairs as training left it
    tok = AutoTokenizer.from_pretrained(run.tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model = PeftModel.from_pretrained(model, str(run.adapter)).eval()
    score = lambda p, answer: float(
        model(
            **tok(
                tok.apply_chat_template(
                    [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": answer}], tokenize=False
                ),
                return_tensors="pt",
            )
        ).logits[0, 0]
    )
    with torch.no_grad():
        assert sum(score(p, p["chosen"]) > score(p, p["rejected"]) for p in PAIRS) >= 15


# --- classification ----------------------------------------------------------------------------------


def test_classification_trains_a_head_and_reports_f1(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = write_jsonl(tmp_path / "c.jsonl", LABELLED)
    run = train(
        config(
            tiny_model_dir,
            data,
            tmp_path / "runs",
            "task=classification",
            "data.format=classification",
            "training.max_steps=30",
            "training.learning_rate=1e-2",
        )
    )
    meta = json.loads(run.meta.read_text())
    before, after = meta["before"], meta["after"]
    assert after["f1_macro"] > before["f1_macro"] + 0.2 and after["accuracy"] >= 0.8, meta
    assert {"precision_macro", "recall_macro", "f1_pos", "f1_neg"} <= set(after)
    assert any("eval_f1_macro" in r for r in run.read_metrics())
    # round trip: base + adapter (with the trained head) reproduces the held-out accuracy
    tok = AutoTokenizer.from_pretrained(run.tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    model.config.pad_token_id = tok.pad_token_id
    model = PeftModel.from_pretrained(model, str(run.adapter)).eval()
    from ayar.data.dataset import load_splits

    cfg = config(tiny_model_dir, data, tmp_path / "runs", "task=classification", "data.format=classification")
    val = load_splits(cfg.data, seed=cfg.training.seed).val
    labels = ["neg", "pos"]
    with torch.no_grad():
        hits = [labels[int(model(**tok(r.text, return_tensors="pt")).logits.argmax())] == r.label for r in val]
    assert sum(hits) / len(hits) == pytest.approx(after["accuracy"])


# --- GRPO --------------------------------------------------------------------------------------------

DIGITS = """
def digits(completions, **_):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]
"""


def test_grpo_raises_the_mean_reward_of_held_out_prompts(tiny_model_dir, tmp_path):
    (tmp_path / "rewards.py").write_text(DIGITS)
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    run = train(
        config(
            tiny_model_dir,
            data,
            tmp_path / "runs",
            "stage=grpo",
            "training.max_steps=30",
            "training.batch_size=8",
            f"grpo.rewards=[{tmp_path / 'rewards.py'}:digits]",
            "grpo.max_completion_length=16",
            "grpo.num_generations=4",
            "data.val_ratio=0.2",
            # a tiny random model: at 5e-3, and with dropout's noise, 30 steps moved the reward either way by seed
            # (after/before 0.6-2.3 over 5 seeds); here 2.4-11x over 3
            "training.learning_rate=2e-2",
            "lora.dropout=0",
        )
    )
    meta = json.loads(run.meta.read_text())
    assert meta["after"]["mean_reward"] > 1.5 * meta["before"]["mean_reward"], meta
    assert any("mean_reward" in r for r in run.read_metrics())
    assert (run.adapter / "adapter_model.safetensors").is_file()


def test_built_in_rewards_score_gsm8k_answers():
    from ayar.training.grpo_rewards import format_reward, gsm8k_answer, length_penalty, reward_functions

    chat = lambda text: [{"role": "assistant", "content": text}]
    done = ["She sold 48 + 24 = 72 clips.\n#### 72", "The answer is 72", "#### 71", "I am not sure."]
    assert gsm8k_answer([chat(t) for t in done], reference=["... #### 72"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert format_reward(done) == [1.0, 0.0, 1.0, 0.0]
    length = length_penalty(10)
    assert length(done, completion_ids=[[0] * 5, [0] * 10, [0] * 15, [0] * 40]) == [0.0, 0.0, -0.5, -1.0]
    with pytest.raises(ConfigError, match="unknown reward 'acc'.*gsm8k_answer"):
        reward_functions(["acc"], 10)
    with pytest.raises(ConfigError, match="batch_size x grad_accum \\(6\\) must be a multiple"):
        train(
            load_config(
                None, ["stage=grpo", "training.batch_size=6", "data.train=sample:gsm8k", "model.name=/nonexistent"]
            )
        )


# --- hyperparameter search ---------------------------------------------------------------------------


def test_hpo_runs_trials_writes_best_config_and_plots_and_resumes(tiny_model_dir, tmp_path):
    import optuna
    import yaml

    from ayar.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    out = tmp_path / "hpo"
    spec = {
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "data": {"train": str(data), "val_ratio": 0.25, "cache": False},
        "training": {"tracker": "none", "batch_size": 4, "max_steps": 4, "eval_steps": 2, "warmup_ratio": 0},
        "hpo": {
            "trials": 3,
            "out": str(out),
            "space": {
                "training.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                "lora.r": {"choices": [4, 8]},
            },
        },
    }
    (tmp_path / "hpo.yaml").write_text(yaml.safe_dump(spec))
    assert main(["hpo", str(tmp_path / "hpo.yaml")]) == 0
    summary = json.loads((out / "trials.json").read_text())
    assert len(summary["trials"]) == 3 and (out / "study.db").is_file()
    best = load_config(out / "best.yaml")  # ready for `ayar train`
    assert best.lora.r == summary["best_params"]["lora.r"]
    assert best.training.learning_rate == pytest.approx(summary["best_params"]["training.learning_rate"])
    assert min(t["eval_loss"] for t in summary["trials"] if t["eval_loss"] is not None) == pytest.approx(
        summary["best_value"]
    )
    header = (out / "trials.md").read_text().splitlines()[0]
    assert (
        header.startswith("| trial | state | eval loss |")
        and "| training.learning_rate |" in header
        and "| lora.r |" in header
    )
    for name in ("optimization_history", "param_importances", "slice"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 0 and (out / "plots" / f"{name}.html").is_file()

    # resume: a trial left running by a killed invocation is re-run with its values; the total is kept
    study = optuna.load_study(study_name="ayar-hpo", storage=f"sqlite:///{out / 'study.db'}")
    stale = study.ask(
        {
            "training.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
            "lora.r": optuna.distributions.CategoricalDistribution([4, 8]),
        }
    )
    assert main(["hpo", str(tmp_path / "hpo.yaml"), "--trials", "4"]) == 0
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert len(trials) == 4 and trials[-1]["training.learning_rate"] == pytest.approx(
        stale.params["training.learning_rate"]
    )


def test_hpo_space_errors_name_the_key():
    from ayar.training.hpo import parse_space

    with pytest.raises(ConfigError, match="lora.rank.*did you mean 'r'"):
        parse_space({"lora.rank": {"choices": [4, 8]}}, {})
    with pytest.raises(ConfigError, match="hpo.space.training.learning_rate: needs numbers low < high"):
        parse_space({"training.learning_rate": {"low": 1e-3, "high": 1e-5}}, {})
    with pytest.raises(ConfigError, match="lora.r: expected an integer, got 'big'"):
        parse_space({"lora.r": {"choices": [4, "big"]}}, {})


# --- QLoRA / QDoRA on the Trainer stages ----------------------------------------------------------------

QUANTIZED_STAGES = {
    "dpo": ["stage=dpo", "training.max_steps=8", "training.eval_steps=4", "method=qdora"],
    "reward": ["stage=reward", "training.max_steps=12"],
    "classification": [
        "task=classification", "data.format=classification", "training.max_steps=30", "training.learning_rate=1e-2"
    ],
    "grpo": [
        "stage=grpo", "training.max_steps=6", "training.batch_size=8", "grpo.max_completion_length=8",
        "grpo.num_generations=4", "data.val_ratio=0.2",
    ],
}  # fmt: skip


@pytest.mark.parametrize("stage", list(QUANTIZED_STAGES))
def test_trainer_stages_train_qlora_over_a_4bit_base(tmp_path, stage, monkeypatch):
    """QLoRA (QDoRA for DPO) on every Trainer stage: the base is 4-bit NF4 while it trains (bitsandbytes' CPU
    backend), evaluations during training leave it trainable (on AVX512-BF16 CPUs bitsandbytes would repack it for
    inference: adapters.py `_keep_4bit_layout`), the adapter trains in fp32 and applies to the full-precision base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ayar.training.recipe import Recipe
    from tests.helpers import save_tiny

    model_dir = save_tiny(tmp_path / "m", "qwen2", hidden_size=64, intermediate_size=128)  # bnb packs 64-wide blocks
    rows = {"classification": LABELLED, "grpo": MATH_ROWS}.get(stage, PAIRS)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    extra = []
    if stage == "grpo":
        (tmp_path / "rewards.py").write_text(DIGITS)
        extra = [f"grpo.rewards=[{tmp_path / 'rewards.py'}:digits]"]
    loaded = []
    load = Recipe.load_model
    monkeypatch.setattr(Recipe, "load_model", lambda self, *a, **k: loaded.append(load(self, *a, **k)) or loaded[-1])
    overrides = [*QUANTIZED_STAGES[stage], *extra, "model.dtype=bfloat16"]
    run = train(config(model_dir, data, tmp_path / "runs", "method=qlora", *overrides))
    assert any(type(m).__name__ == "Linear4bit" for m in loaded[0][0].modules())  # trained over a 4-bit base
    meta = json.loads(run.meta.read_text())
    assert meta["plan"]["quantized"] and meta["steps"] == meta["total_steps"]
    if stage == "dpo":
        assert losses(run)[-1] < losses(run)[0] / 2, losses(run)
        assert sum("eval_loss" in r for r in run.read_metrics()) >= 2  # evaluated during training, trained on after
    elif stage == "reward":
        assert meta["after"]["accuracy"] == 1.0 and meta["after"]["margin"] > meta["before"]["margin"] + 1, meta
    elif stage == "classification":
        assert meta["after"]["f1_macro"] > meta["before"]["f1_macro"] + 0.2, meta
    adapter = load_file(run.adapter / "adapter_model.safetensors")
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 0  # GRPO too: it trained
    assert {v.dtype for v in adapter.values()} == {torch.float32}  # trained in fp32 as SFT's (TRL casts to bf16)
    assert json.loads((run.adapter / "adapter_config.json").read_text())["use_dora"] is (stage == "dpo")
    auto = AutoModelForCausalLM if stage in ("dpo", "grpo") else AutoModelForSequenceClassification
    extra_args = {} if stage in ("dpo", "grpo") else {"num_labels": 2 if stage == "classification" else 1}
    model = PeftModel.from_pretrained(auto.from_pretrained(model_dir, **extra_args), str(run.adapter))
    assert not any("4bit" in type(m).__name__ for m in model.modules())  # the full base takes the adapter


def test_a_trainer_stage_recomputes_activations_when_asked(tiny_model_dir, tmp_path, monkeypatch):
    """`training.gradient_checkpointing: true` on a Trainer stage (DPO): each layer's forward runs again in backward
    (counted on the first layer) and the losses are the ones without it (dropout off); unset, it stays off."""
    from ayar.training.recipe import Recipe

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    load, calls = Recipe.load_model, []

    def counted(self, *a, **k):
        loaded = load(self, *a, **k)
        # recomputing runs the layer's forward (not its __call__): counted on its first module
        loaded[0].model.layers[0].input_layernorm.register_forward_pre_hook(lambda *_: calls.append(1))
        return loaded

    monkeypatch.setattr(Recipe, "load_model", counted)
    runs = {}
    for name, extra in (("plain", []), ("recomputed", ["training.gradient_checkpointing=true"])):
        calls.clear()
        kw = ["stage=dpo", "training.max_steps=3", "data.val_ratio=0", "lora.dropout=0", *extra]
        runs[name] = (train(config(tiny_model_dir, data, tmp_path / name, *kw)), len(calls))
    (plain, plain_calls), (recomputed, recomputed_calls) = runs["plain"], runs["recomputed"]
    assert recomputed_calls == plain_calls + 3, (plain_calls, recomputed_calls)  # once more per step
    assert losses(recomputed) == pytest.approx(losses(plain), rel=1e-5)


def test_a_trainer_stage_resumes_from_its_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from ayar.training import trl_stage

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    kw = ["stage=dpo", "training.max_steps=4", "training.save_steps=2", "data.val_ratio=0"]
    full = train(config(tiny_model_dir, data, tmp_path / "a", *kw))
    write = trl_stage._MetricsLog.write

    def dies_after_step_3(self, step, logs):
        write(self, step, logs)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(trl_stage._MetricsLog, "write", dies_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_model_dir, data, tmp_path / "b", *kw))
    monkeypatch.setattr(trl_stage._MetricsLog, "write", write)
    resumed = train(resume=next((tmp_path / "b").iterdir()))
    got = [(m["step"], m["loss"]) for m in resumed.read_metrics() if "loss" in m]
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert [l for _, l in got] == pytest.approx(losses(full), rel=1e-5)


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_rows_a_trainer_would_leave_out_are_said_before_training(tiny_model_dir, tmp_path, stage):
    """TRL's DPO drops a pair whose prompt alone fills max_length, its reward trainer one longer than max_length:
    ayar finds the same rows before training (the trainer's own dataset is that much shorter) and says which; when
    no row is left, a clear error instead of a trainer with nothing to train on."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ayar.data.dataset import load_splits
    from ayar.errors import DataError
    from ayar.models.load import load_tokenizer
    from ayar.training import preference, reward_model
    from ayar.training.plan import decide
    from ayar.training.trainer_plan import trainer_drops
    from ayar.training.trl_stage import training_kwargs

    long = {"prompt": "Tell me " + "about the sea and the sky " * 20, "chosen": "It is blue.", "rejected": "No."}
    data = write_jsonl(tmp_path / "p.jsonl", [*PAIRS[:5], long])
    cfg = config(tiny_model_dir, data, tmp_path / "runs", f"stage={stage}", "data.max_length=48", "data.val_ratio=0")
    tok, splits = load_tokenizer(str(tiny_model_dir)), load_splits(cfg.data)
    drops = trainer_drops(cfg, tok, splits.train)
    assert [r.where for r, _ in drops] == [f"{data}:6"], drops
    assert ("prompt alone" if stage == "dpo" else "longer half") in drops[0][1]
    module = preference if stage == "dpo" else reward_model
    model = (AutoModelForCausalLM if stage == "dpo" else AutoModelForSequenceClassification).from_pretrained(
        tiny_model_dir, **({} if stage == "dpo" else {"num_labels": 1})
    )
    model.config.pad_token_id = tok.pad_token_id
    args = training_kwargs(cfg, SimpleNamespace(checkpoints=tmp_path / "ckpt"), decide(cfg))
    trainer = module.STAGE.build(cfg, model, tok, splits, args, [])
    assert len(trainer.train_dataset) == len(splits.train) - 1  # the trainer left out that row, as found
    only_long = write_jsonl(tmp_path / "long.jsonl", [long, {**long, "chosen": "Blue."}])
    with pytest.raises(DataError, match=r"2 of 2 train rows \(all of them\) left out .*long.jsonl:1: .*max_length"):
        train(config(tiny_model_dir, only_long, tmp_path / "runs", f"stage={stage}", "data.max_length=48",
                     "data.val_ratio=0"))  # fmt: skip


def test_a_task_head_over_a_bf16_base_trains_in_fp32(tiny_model_dir, tmp_path):
    """A reward model's score head, trained in full beside the adapters, keeps fp32 weights over a bf16 base as the
    adapters do: in bf16 AdamW's updates under half a bf16 step round away (at 0.04 half a step is 1.2e-4, more than
    a learning rate of 1e-4 moves a weight), and accelerate's FSDP turns it fp32 anyway (the same run either way)."""
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    kw = ["stage=reward", "training.max_steps=1", "data.val_ratio=0", "model.dtype=bfloat16"]
    run = train(config(tiny_model_dir, data, tmp_path / "runs", *kw))
    adapter = load_file(run.adapter / "adapter_model.safetensors")
    assert adapter["base_model.model.score.weight"].dtype == torch.float32
    assert {v.dtype for v in adapter.values()} == {torch.float32}


def test_a_bf16_trainer_stage_computes_its_adapters_on_the_base_dtype(tiny_model_dir, tmp_path, monkeypatch):
    """Over a bf16 base a Trainer stage's adapters read their input as it is, under autocast (as ayar's own loop),
    not a fp32 copy of it that autocast casts back (peft's default): the same losses (the same numbers are
    multiplied) with no copy kept per adapter; on a CPU the dropouts are ayar's, which keep no mask."""
    from ayar.kernels.dropout import FastDropout
    from ayar.training import trl_stage

    real, seen = trl_stage.compute_as_own_loop, {}

    def spied(name):
        def compute(trainer, device):
            if name != "peft":
                real(trainer, device)
            lora_a = next(m for n, m in trainer.model.named_modules() if n.endswith("q_proj.lora_A.default"))

            def record(module, args):  # the passes that train (GRPO samples its answers outside them, as peft does)
                if torch.is_grad_enabled():
                    seen.setdefault(name, set()).add(args[0].dtype)

            lora_a.register_forward_pre_hook(record)
            dropouts = [m for n, m in trainer.model.named_modules() if ".lora_dropout." in n]
            seen[f"{name} dropouts"] = {type(m).__name__ for m in dropouts}

        return compute

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    runs = {}
    for name in ("peft", "own"):
        monkeypatch.setattr(trl_stage, "compute_as_own_loop", spied(name))
        kw = ["stage=dpo", "training.max_steps=3", "data.val_ratio=0", "model.dtype=bfloat16"]
        runs[name] = train(config(tiny_model_dir, data, tmp_path / name, *kw))
    assert seen["peft"] == {torch.float32} and seen["own"] == {torch.bfloat16}, seen
    assert losses(runs["own"]) == pytest.approx(losses(runs["peft"]), rel=1e-6)

    monkeypatch.setattr(trl_stage, "compute_as_own_loop", spied("grpo"))
    (tmp_path / "rewards.py").write_text(DIGITS)
    kw = ["stage=grpo", "training.max_steps=1", "training.batch_size=4", "grpo.num_generations=4",
          "grpo.max_completion_length=8", f"grpo.rewards=[{tmp_path / 'rewards.py'}:digits]", "data.val_ratio=0",
          "model.dtype=bfloat16", "lora.dropout=0.1"]  # fmt: skip
    train(config(tiny_model_dir, write_jsonl(tmp_path / "m.jsonl", MATH_ROWS), tmp_path / "grpo", *kw))
    assert seen["grpo"] == {torch.bfloat16} and seen["grpo dropouts"] == {FastDropout.__name__}, seen
