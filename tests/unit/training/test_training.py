"""Training on tiny random models: loss goes down, adapters round-trip, resume is exact, packing is clean."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ayar.config import LoraConfig, TrainingConfig
from ayar.data.collate import collate
from ayar.data.records import Record as Conversation
from ayar.data.render import Renderer
from ayar.models.adapters import apply_method, load_adapter
from ayar.rundir import RunDir
from ayar.training import checkpoint as ckpt
from ayar.training.loop import run_loop
from ayar.training.loss import loss_sum, reference_loss
from ayar.training.sft import train_sft
from tests.helpers import (
    FAMILIES,
    MATH_ROWS,
    examples,
    loop_plan,
    make_model,
    make_tokenizer,
    run_config,
    tiny_train_config,
    write_jsonl,
)


def test_loss_on_trained_positions_equals_reference_loss():
    tok = make_tokenizer("llama")
    model = make_model("llama", tok)
    batch = collate(examples(tok)[:4], tok.pad_token_id)
    s, n = loss_sum(model, batch)
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert float(s.detach()) / n == pytest.approx(float(reference_loss(model, batch).detach()), rel=1e-5)


def test_packing_has_no_cross_contamination():
    # Packed (one row, position_ids restart) must give the same summed loss as separate padded rows.
    tok = make_tokenizer("qwen2")
    model = make_model("qwen2", tok).eval()
    exs = examples(tok)[:3]
    padded, n1 = loss_sum(model, collate(exs, tok.pad_token_id))
    packed, n2 = loss_sum(model, collate(exs, tok.pad_token_id, packing=True))
    assert n1 == n2
    assert float(packed.detach()) == pytest.approx(float(padded.detach()), rel=1e-4)


def _train(model, tok, steps, **kw):
    import tempfile
    from pathlib import Path

    tcfg = TrainingConfig(
        **{"learning_rate": 3e-2, "batch_size": 4, "max_steps": steps, "warmup_ratio": 0, "tracker": "none", **kw}
    )
    logs = []
    exs = examples(tok)
    res = run_loop(
        model,
        exs,
        [],
        tcfg,
        plan=loop_plan(model, tcfg, exs),
        pad_id=tok.pad_token_id,
        ckpt_root=Path(tempfile.mkdtemp()),
        on_log=logs.append,
    )
    return logs, res


def test_tiny_overfit_drives_loss_down():
    tok = make_tokenizer("llama")
    model = apply_method(make_model("llama", tok), "lora", LoraConfig(r=8, alpha=16, dropout=0.0))
    logs, _ = _train(model, tok, 30)
    first, last = logs[0]["loss"], logs[-1]["loss"]
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_lora_targets_train_and_round_trip(family, tmp_path):
    tok = make_tokenizer(family)
    base = make_model(family, tok)
    model = apply_method(base, "lora", LoraConfig(r=4, alpha=8, dropout=0.0))
    # all-linear found the family's projections (Phi-3 fuses them into qkv_proj / gate_up_proj).
    lora_modules = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    expected = {"phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}}.get(
        family, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )
    assert lora_modules == expected
    logs, _ = _train(model, tok, 6)
    assert logs[-1]["loss"] < logs[0]["loss"]
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "adapter").glob("*.bin"))
    batch = collate(examples(tok)[:2], tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reloaded = load_adapter(make_model(family, tok), str(tmp_path / "adapter")).eval()
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(want, got)


def test_target_modules_that_do_not_exist_list_the_real_ones():
    from ayar.errors import ConfigError

    tok = make_tokenizer("llama")
    with pytest.raises(ConfigError, match=r"\['query'\] not found in the model; linear layers here: .*q_proj"):
        apply_method(make_model("llama", tok), "lora", LoraConfig(target_modules=["query"]))


class Interrupt(Exception):
    pass


def test_resume_gives_the_identical_next_loss(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    kw = dict(max_steps=6, save_steps=2, learning_rate=5e-3, eval_steps=2)
    full = train_sft(tiny_train_config(tiny_model_dir, data, tmp_path / "a", **kw))
    want = [r for r in full.read_metrics() if "loss" in r]

    def kill_at_3(state):
        if state.step == 3:
            raise Interrupt  # dies after step 3, whose checkpoint was never written

    with pytest.raises(Interrupt):
        train_sft(tiny_train_config(tiny_model_dir, data, tmp_path / "b", **kw), callbacks=[kill_at_3])
    run_b = RunDir(next((tmp_path / "b").iterdir()))
    # A half-written checkpoint (as left by a kill mid-save) is never picked.
    (run_b.checkpoints / ".tmp-checkpoint-0000004-x").mkdir()
    assert ckpt.latest_checkpoint(run_b.checkpoints).name == "checkpoint-0000002"
    resumed = train_sft(resume=run_b.path)
    got = [r for r in resumed.read_metrics() if "loss" in r]
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(want, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), (a["step"], a["loss"], b["loss"])
    assert not any(p.name.startswith(".tmp-") for p in run_b.checkpoints.iterdir())


def test_run_directory_describes_itself(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    cfg = tiny_train_config(tiny_model_dir, data, tmp_path / "runs", max_steps=4, eval_steps=2, tracker="tensorboard")
    run = train_sft(cfg)
    for name in (
        "config.yaml",
        "run.json",
        "metrics.jsonl",
        "loss.png",
        "README.md",
        "tokenizer/tokenizer.json",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    ):
        assert (run.path / name).exists(), name
    assert list(run.tensorboard.glob("events.*"))
    meta = json.loads(run.meta.read_text())
    assert meta["status"] == "completed" and meta["steps"] == 4 and meta["dtype"] == "float32"
    assert meta["params"]["trainable"] < meta["params"]["total"]
    assert any(r.get("eval_loss") is not None for r in run.read_metrics())


def test_early_stopping_keeps_the_best_adapter(tiny_model_dir, tmp_path, monkeypatch):
    from ayar.training import loop

    # eval loss made to rise after the first evaluation: the real loss plus 1 per later evaluation
    real, calls = loop.evaluate, []

    def rising(model, *args):
        calls.append({k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k})
        return real(model, *args) + len(calls) - 1

    monkeypatch.setattr(loop, "evaluate", rising)
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    cfg = tiny_train_config(
        tiny_model_dir, data, tmp_path / "runs", max_steps=40, eval_steps=1, early_stopping_patience=2
    )
    run = train_sft(cfg)
    meta = run.read_meta()
    assert meta["stopped_early"] and meta["steps"] == 3
    evals = [r["eval_loss"] for r in run.read_metrics() if r.get("eval_loss") is not None]
    assert meta["best_eval_loss"] == min(evals) == evals[0] and meta["best_step"] == 1
    saved = load_file(run.adapter / "adapter_model.safetensors")  # the adapter as it was at step 1
    assert len(saved) == len(calls[0]) > 0
    for name, value in calls[0].items():
        torch.testing.assert_close(saved[name.replace(".default", "")], value)
    assert any(not torch.equal(calls[0][n], calls[-1][n]) for n in calls[0])  # and training had moved on since


TINY_LOSS = """
import torch.nn.functional as F


def tiny(logits, targets):
    # cross-entropy a millionth as large: its gradients sit below fp16's smallest number unless the loss is scaled
    return F.cross_entropy(logits.float(), targets, reduction="none") * 1e-6
"""


def test_fp16_compute_scales_the_loss(tiny_model_dir, tmp_path):
    """fp16 compute (a full fine-tune under fp16 autocast: on an older GPU; here on the CPU) scales the loss: with a
    loss whose gradients underflow fp16, the first step's gradient norm is the one fp32 computes (unscaled it is ~0);
    the plan says so, the scale is logged and kept in the checkpoint."""
    (tmp_path / "losses.py").write_text(TINY_LOSS)
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    norms = {}
    for dtype in ("float32", "float16"):
        run = train_sft(
            run_config(
                tiny_model_dir,
                data,
                tmp_path / dtype,
                "method=full",
                f"model.dtype={dtype}",
                "data.val_ratio=0",
                "training.max_steps=2",
                "training.save_steps=1",
                "training.batch_size=4",
                "training.warmup_ratio=0",
                f"training.loss={tmp_path / 'losses.py'}:tiny",
            )  # fmt: skip
        )
        records = [r for r in run.read_metrics() if "grad_norm" in r]
        norms[dtype] = records[0]["grad_norm"]
    plan = run.read_meta()["plan"]
    assert plan["loss_scaling"] is True and plan["autocast"] == "float16"
    assert norms["float32"] > 0 and norms["float16"] == pytest.approx(norms["float32"], rel=0.05), norms
    assert records[0]["loss_scale"] == 65536.0  # torch's starting scale: no overflow here
    state = json.loads((ckpt.latest_checkpoint(run.checkpoints) / "state.json").read_text())
    assert state["loss_scale"]["scale"] == 65536.0


def test_grad_accumulation_matches_one_big_batch():
    # 2 micro-batches of 2 == 1 batch of 4: same step loss and same updated weights (the loss is the
    # mean over all trained tokens of the optimizer step, however it is split).
    tok = make_tokenizer("llama")
    runs = []
    for bs, acc in ((4, 1), (2, 2)):
        model = apply_method(make_model("llama", tok), "lora", LoraConfig(r=4, alpha=8, dropout=0.0))
        logs, _ = _train(model, tok, 1, batch_size=bs, grad_accum=acc)
        weights = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
        runs.append((logs[0]["loss"], weights))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-6)


def test_passes_of_similar_length_rows_give_the_same_step_as_one_pass(tiny_model_dir, tmp_path):
    """training.rows_per_pass changes padding and peak memory, not the gradient: same losses and adapter."""
    from ayar.training.loop import length_groups
    from ayar.training.sft import train_sft

    exs = [type("E", (), {"input_ids": [0] * n})() for n in (5, 1, 4, 2)]
    assert [[len(e.input_ids) for e in g] for g in length_groups(exs, 2)] == [[1, 2], [4, 5]]
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    runs = []
    for rpp in (4, 1):
        cfg = tiny_train_config(tiny_model_dir, data, tmp_path / f"runs{rpp}", max_steps=3, rows_per_pass=rpp)
        runs.append([r["loss"] for r in train_sft(cfg).read_metrics() if "loss" in r])
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)  # before any update: the same loss
    assert runs[0] == pytest.approx(runs[1], rel=1e-3)  # after Adam updates: summation order differs in the last bits


def test_bf16_base_with_fp32_adapters_trains_under_autocast(tiny_model_dir):
    """bf16 weights: the adapters run in bf16 under autocast (training/loss.py), their weights and gradients stay
    fp32, and the loss agrees with peft's default path (inputs copied to fp32) to bf16 precision."""
    from transformers import AutoModelForCausalLM

    from ayar.training.loss import _loss_sum, compute_context, loss_sum

    tok = make_tokenizer("qwen2")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = apply_method(model, "lora", LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # non-zero B, so the adapters change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    r = Renderer(tok, max_length=64)
    batch = collate(
        [
            r.render(
                Conversation(
                    [{"role": "user", "content": x["instruction"]}, {"role": "assistant", "content": x["output"]}], "m"
                )
            )
            for x in MATH_ROWS[:4]
        ],
        tok.pad_token_id,
    )
    with compute_context(model):
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")  # nothing leaks past the context
    fast, n = loss_sum(model, batch)
    default, _ = _loss_sum(model, batch)
    assert float(fast.detach()) / n == pytest.approx(float(default.detach()) / n, rel=2e-2)
    fast.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_A" in name]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


# --- PEFT variants through the one conversion point (issue 5, first part) ----------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=dora"],
        ["lora.rslora=true"],
        ["training.loraplus_lr_ratio=16"],
        ["lora.freeze_first_layers=1"],
        ["lora.modules_to_save=[lm_head]"],
    ],
)
def test_peft_variants_train_and_round_trip(tiny_model_dir, tmp_path, overrides):
    import torch

    from ayar.infer.load import load_engine
    from ayar.training.sft import train_sft

    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    cfg = run_config(tiny_model_dir, data, tmp_path / "runs", "training.max_steps=8", "training.batch_size=4",
                     "data.val_ratio=0.2", "data.cache=false", "training.warmup_ratio=0", "training.learning_rate=5e-3",
                     *overrides)  # fmt: skip
    run = train_sft(cfg)
    losses = [m["loss"] for m in run.read_metrics() if "loss" in m]
    assert losses[-1] < losses[0], losses  # it trains
    adapter_cfg = json.loads((run.adapter / "adapter_config.json").read_text())
    key, value = overrides[0].split("=", 1)
    if key == "method":
        assert adapter_cfg["use_dora"] is True
    elif key == "lora.rslora":
        assert adapter_cfg["use_rslora"] is True
    elif key == "lora.freeze_first_layers":
        assert adapter_cfg["layers_to_transform"] == [1]
        engine = load_engine(run.path, log=lambda *_: None)
        names = [n for n, _ in engine.model.named_parameters() if "lora_A" in n]
        assert names and all(".layers.1." in n for n in names)
    elif key == "lora.modules_to_save":
        assert adapter_cfg["modules_to_save"] == ["lm_head"]
    # the saved adapter reloads to the same logits as the model that was trained
    engine = load_engine(run.path, log=lambda *_: None)
    ids = engine.tok("What is 7 plus 5?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        again = load_engine(run.path, log=lambda *_: None).model(input_ids=ids).logits
        assert torch.equal(engine.model(input_ids=ids).logits, again)


def test_modules_trained_in_full_over_a_bf16_base_train_in_fp32(tiny_model_dir):
    """peft's copies of `lora.modules_to_save` start in the base's dtype; ayar trains them in fp32 as the adapters
    (models/adapters.py `trainable_in_fp32`): in bf16 AdamW's small updates round away, and FSDP and ZeRO-3 take one
    dtype of trained weights per unit (test_sharding.py runs them). The frozen base stays bf16."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = apply_method(base, "lora", LoraConfig(modules_to_save=["input_layernorm"]))
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("input_layernorm.modules_to_save" in n for n in trained)
    assert set(trained.values()) == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_loraplus_puts_b_matrices_in_a_faster_group(tiny_model_dir):
    from types import SimpleNamespace

    from ayar.models.adapters import apply_method
    from ayar.training.optim import build_optimizer
    from tests.helpers import make_model, make_tokenizer

    model = apply_method(
        make_model("qwen2", make_tokenizer("qwen2")),
        "lora",
        SimpleNamespace(
            r=4,
            alpha=8,
            dropout=0.0,
            target_modules="all-linear",
            rslora=False,
            modules_to_save=None,
            freeze_first_layers=0,
        ),
    )
    opt = build_optimizer(
        model, SimpleNamespace(optimizer="adamw", learning_rate=1e-4, weight_decay=0.0, loraplus_lr_ratio=16)
    )
    rates = sorted({g["lr"] for g in opt.param_groups if g["params"]})
    assert rates[0] == 1e-4 and rates[-1] == 16e-4
    assert opt.defaults["fused"]  # CPU parameters: torch's fused AdamW (train/optim.fused_adamw)


@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_qlora_trains_over_a_4bit_base_and_its_adapter_loads_on_the_full_base(tmp_path, method):
    """bitsandbytes' CPU backend: the base is NF4 (4-bit) during training (and after an evaluation: adapters.py
    `_keep_4bit_layout`); the adapter applies to the full base."""
    from ayar.config import load_config
    from ayar.infer.load import load_engine
    from tests.helpers import save_tiny

    model_dir = save_tiny(tmp_path / "m", "qwen2", hidden_size=64, intermediate_size=128)  # bnb packs 64-wide blocks
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    cfg = load_config(
        None,
        [
            f"model.name={model_dir}",
            "model.dtype=bfloat16",
            f"data.train={data}",
            f"output.dir={tmp_path / 'runs'}",
            "training.tracker=none",
            "training.max_steps=8",
            "training.batch_size=4",
            "data.val_ratio=0.2",
            "data.cache=false",
            "training.warmup_ratio=0",
            "training.learning_rate=5e-3",
            "training.eval_steps=4",  # an evaluation during training leaves the 4-bit base trainable
            f"method={method}",
        ],
    )
    run = train_sft(cfg)
    losses = [m["loss"] for m in run.read_metrics() if "loss" in m]
    assert losses[-1] < losses[0] - 1, losses
    meta = json.loads(run.meta.read_text())
    full = sum(p.numel() for p in load_engine(str(model_dir), **{"log": lambda *_: None}).model.parameters())
    assert meta["params"]["total"] == full + meta["params"]["trainable"]  # 4-bit weights counted as weights, not bytes
    assert json.loads((run.adapter / "adapter_config.json").read_text())["use_dora"] is (method == "qdora")
    engine = load_engine(run.path, log=lambda *_: None)
    assert not any("4bit" in type(m).__name__ for m in engine.model.modules())  # served on the unquantized base
    assert engine.generate("What is 7 plus 5?", max_new_tokens=3).new_tokens > 0


def test_qlora_without_bitsandbytes_names_the_extra(monkeypatch):
    import builtins

    from ayar.errors import ConfigError
    from ayar.models.adapters import quantization_config

    real_import = builtins.__import__
    monkeypatch.setattr(
        builtins,
        "__import__",
        lambda name, *a, **k: (
            (_ for _ in ()).throw(ImportError(name)) if name == "bitsandbytes" else real_import(name, *a, **k)
        ),
    )
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[qlora\]'.*use method: lora"):
        quantization_config("qlora", torch.bfloat16)
    assert quantization_config("lora", torch.bfloat16) is None


def test_compare_trains_each_method_and_writes_the_table(tiny_model_dir, tmp_path):
    from ayar.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            f"model.name={tiny_model_dir}",
            "model.dtype=float32",
            f"data.train={data}",
            "training.tracker=none",
            "training.max_steps=3",
            "training.batch_size=4",
            "data.val_ratio=0.2",
            "data.cache=false",
            "--methods",
            "lora,dora,rslora",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads((out / "compare.json").read_text())
    assert list(rows) == ["lora", "dora", "rslora"]
    assert rows["dora"]["trainable_params"] > rows["lora"]["trainable_params"] == rows["rslora"]["trainable_params"]
    assert all(r["final_eval_loss"] is not None and r["eval_curve"] for r in rows.values())
    table = (out / "compare.md").read_text()
    assert table.count("\n") == 5 and "| dora |" in table and (out / "compare.png").stat().st_size > 0
    assert main(["compare", f"data.train={data}", "--methods", "lora,qlora2", "--out", str(out)]) == 2


def test_resume_after_early_stopping_keeps_the_best_adapter(tiny_model_dir, tmp_path, monkeypatch):
    """The best adapter was held in memory only: a run killed after its best evaluation and resumed saved its
    last adapter instead. It is kept on disk beside the checkpoints now (checkpoints/best)."""
    from ayar.training import loop

    real, calls = loop.evaluate, []

    def rising(model, *args):
        calls.append({k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k})
        return real(model, *args) + len(calls) - 1

    def killed_after_step_2(state):
        if state.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "evaluate", rising)
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    cfg = tiny_train_config(
        tiny_model_dir, data, tmp_path / "runs", max_steps=40, eval_steps=1, save_steps=1, early_stopping_patience=3
    )
    with pytest.raises(KeyboardInterrupt):
        train_sft(cfg, callbacks=[killed_after_step_2])
    (run_dir,) = (tmp_path / "runs").iterdir()
    run = train_sft(resume=run_dir)
    meta = run.read_meta()
    assert meta["stopped_early"] and meta["best_step"] == 1 and meta["steps"] == 4
    saved = load_file(run.adapter / "adapter_model.safetensors")
    for name, value in calls[0].items():  # the adapter as it was at step 1, before the kill
        torch.testing.assert_close(saved[name.replace(".default", "")], value)


def test_a_metrics_line_cut_short_by_a_kill_is_dropped(tmp_path):
    from ayar.errors import AyarError
    from ayar.rundir import RunDir

    run = RunDir(tmp_path)
    run.metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert run.read_metrics() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    run.truncate_metrics(1)
    assert run.read_metrics() == [{"step": 1, "loss": 2.0}]
    run.metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')  # a damaged line in the middle is not a kill
    with pytest.raises(AyarError, match="metrics.jsonl:2"):
        run.read_metrics()


def test_output_path_is_the_exact_run_directory(tiny_model_dir, tmp_path):
    """`output.path` (or `output_dir`, as HF users write it): scripts know where the run goes. A path that holds
    files is refused before anything is written, and left as it was."""
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    cfg = tiny_train_config(tiny_model_dir, data, tmp_path / "runs", max_steps=1)
    cfg.output.path = str(tmp_path / "exact")
    run = train_sft(cfg)
    assert run.path == tmp_path / "exact" and (run.path / "adapter" / "adapter_config.json").is_file()
    before = sorted(p.name for p in run.path.iterdir())
    from ayar.errors import AyarError

    with pytest.raises(AyarError, match="not an empty folder"):
        train_sft(cfg)
    assert sorted(p.name for p in run.path.iterdir()) == before


def test_plain_peft_loads_the_adapter_folder_and_reproduces_the_run(tiny_run):
    """adapter/ holds the tokenizer too, and PeftModel.from_pretrained(base, run/adapter) gives the run's
    logits; the run's README shows that snippet, and loss.png plots the lr and gradient norm the loop logs."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ayar.infer.load import load_engine

    meta = json.loads((tiny_run / "run.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_run / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(meta["base_model"]), tiny_run / "adapter")
    engine = load_engine(tiny_run, log=lambda *_: None)
    ids = engine.prompt_ids([{"role": "user", "content": "What is 12 plus 30?"}])
    assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        theirs = model.eval()(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(theirs, engine.model(input_ids=torch.tensor([ids])).logits)
    assert "PeftModel.from_pretrained(base" in (tiny_run / "README.md").read_text()
    records = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in records if "loss" in r)
