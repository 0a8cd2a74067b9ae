"""Memory planner (shape arithmetic, fit/suggestions, the CLI) and the bench harness's pieces."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ayar.data.render import Example
from ayar.training.memory import MemoryPlan, largest_pass, model_shape, plan_memory, suggestions
from ayar.training.plan import predicted_layout
from tests.helpers import MATH_ROWS, make_model, make_tokenizer, write_jsonl


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "phi3"])
def test_parameter_count_from_config_matches_the_model(family):
    from ayar.config.schema import LoraConfig
    from ayar.models.adapters import apply_method, parameter_counts

    model = make_model(family, make_tokenizer(family))
    shape = model_shape(model.config, "all-linear", 8)
    assert shape.params == sum(p.numel() for p in model.parameters())
    peft_model = apply_method(model, "lora", LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    assert shape.lora_params == parameter_counts(peft_model)[0]  # phi3's fused qkv_proj / gate_up_proj included


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_qlora_weights_are_counted_at_4_bits_with_the_rest_in_its_dtype(tmp_path, dtype):
    """The planner's QLoRA weight bytes against what bitsandbytes allocates for the same model as ayar prepares it
    (`for_trainer`): the rest of a bf16 base stays bf16, an fp16 base's goes to fp32."""
    from ayar.config import LoraConfig
    from ayar.models.adapters import for_trainer, quantization_config
    from ayar.training.memory import plan_memory
    from tests.helpers import save_tiny

    path = save_tiny(tmp_path / "m", "qwen2", hidden_size=256, intermediate_size=512, num_attention_heads=8)
    from transformers import AutoModelForCausalLM

    weights = getattr(torch, dtype)
    AutoModelForCausalLM.from_pretrained(path, dtype=weights).save_pretrained(path)  # stored as loaded: mapped
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization_config("qlora", weights), dtype=weights
    )
    import gc

    def mapped() -> bool:  # the loaded file still mapped into this process (its read pages counted in its RSS)
        gc.collect()
        return str(path.resolve()) in open("/proc/self/maps").read()

    assert mapped()  # transformers' loading leaves the rest as views into the file
    model, _ = for_trainer(model, "qlora", LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    assert not mapped()  # the rest copied (bf16) or cast (fp16 -> fp32): the file let go
    rest = {p.dtype for p in model.parameters() if p.__class__.__name__ != "Params4bit"}
    assert rest == {torch.float32 if dtype == "float16" else torch.bfloat16}
    allocated = sum(p.numel() * p.element_size() for p in model.parameters())  # 4-bit weights: 2 per uint8
    for p in model.parameters():  # + the per-block scales: uint8 absmax, double-quantized by fp32 ones
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            allocated += (
                qs.absmax.numel() * qs.absmax.element_size()
                + qs.state2.absmax.numel() * qs.state2.absmax.element_size()
            )
    shape = model_shape(model.config, "all-linear", 8)
    planned = lambda method: plan_memory(
        shape, weight_dtype=dtype, device="cpu", tokens=64, trained=32, method=method, available=2**40
    ).parts["weights"]
    assert planned("qlora") == pytest.approx(allocated, rel=0.05)
    assert planned("qlora") < planned("lora")


def test_lora_parameter_count_for_named_and_regex_targets():
    from ayar.config.schema import LoraConfig
    from ayar.models.adapters import apply_method, parameter_counts

    for targets in (["q_proj", "v_proj"], r".*\.mlp\..*_proj"):
        model = make_model("llama", make_tokenizer("llama"))
        shape = model_shape(model.config, targets, 4)
        assert (
            shape.lora_params
            == parameter_counts(apply_method(model, "lora", LoraConfig(r=4, alpha=8, target_modules=targets)))[0]
        )


@pytest.mark.parametrize("modules", [["lm_head"], ["input_layernorm", "embed_tokens"]])
def test_modules_trained_in_full_are_planned_with_the_adapters(modules):
    """`lora.modules_to_save` over a bf16 base: the planner counts peft's trained copies with the adapters (they
    were left out: 16 bytes a weight unplanned, 453 MB for SmolLM2's output head), as many weights as peft trains,
    and after an AdamW step the trained weights, their gradients and AdamW states take what the plan holds for them
    (fp32, models/adapters.py `trainable_in_fp32`)."""
    from ayar.config.schema import LoraConfig
    from ayar.models.adapters import apply_method, parameter_counts

    model = make_model("llama", make_tokenizer("llama")).to(torch.bfloat16)
    shape = model_shape(model.config, "all-linear", 8, modules_to_save=modules)
    lora = LoraConfig(r=8, alpha=16, target_modules="all-linear", modules_to_save=modules)
    peft_model = apply_method(model, "lora", lora)
    assert shape.lora_params == parameter_counts(peft_model)[0] > model_shape(model.config, "all-linear", 8).lora_params
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained)
    for p in trained:
        p.grad = torch.ones_like(p)
    optimizer.step()
    held = sum(
        t.numel() * t.element_size() for p in trained for t in (p, p.grad, *optimizer.state[p].values()) if t.dim()
    )
    planned = plan_memory(
        shape, weight_dtype="bfloat16", device="cpu", tokens=64, trained=32, method="lora", available=2**40
    ).parts["adapter + grads + AdamW"]
    assert planned == held


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_full_fine_tunes_gradients_meet_the_pass_only_where_a_step_takes_several(checkpointing):
    """The loop sets gradients to None at each step: where a step is one pass, its forward builds the activations with
    no gradient alive, and backward frees them as it makes the gradients, so the peak is the larger of the two ends.
    Where a step takes several passes (rows per pass or accumulation) the gradients of the first are kept through the
    next one's forward, beside its activations. (Measured both ways: benchmarks/README.md.)"""
    from transformers import AutoConfig

    from ayar.config import load_config
    from ayar.training.memory import FULL_GRADIENTS, Layout, plan_layout

    config = AutoConfig.for_model("llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)  # fmt: skip
    shape = model_shape(config, "all-linear", 16)
    examples = [Example([1] * 500, [1] * 250, "x") for _ in range(8)]
    layout = Layout(2, True, False, checkpointing)

    def plan(*overrides):
        cfg = load_config(None, ["method=full", *overrides])
        return plan_layout(shape, cfg, examples, "float32", "cpu", layout, 2**40, compute_dtype="bfloat16")

    grads = shape.params * 4
    one = plan("training.batch_size=2")  # 2 rows per pass: a step is one pass
    several = plan("training.batch_size=8")  # four passes a step
    assert several.parts[FULL_GRADIENTS] == grads
    assert plan("training.batch_size=2", "training.grad_accum=2").parts[FULL_GRADIENTS] == grads
    held = sum(one.parts[k] for k in ("weights", "AdamW (full)", "runtime"))
    pass_parts = one.total - held - one.parts[FULL_GRADIENTS]
    # the peak holds the pass (the start of backward) and every gradient (its end), not both
    assert one.total >= max(held + pass_parts, held + grads) and one.total < several.total
    # without checkpointing the pass outweighs the gradients; with it, less is kept than the gradients weigh
    assert (one.parts[FULL_GRADIENTS] > 0) == checkpointing


def test_largest_pass_padded_vs_packed():
    exs = [Example([1] * n, [1] * (n // 2), "x") for n in (10, 50, 30, 20)]
    packed, padded = largest_pass(exs, 2, packed=True), largest_pass(exs, 2, packed=False)
    assert (packed.tokens, packed.trained, packed.rows, packed.lengths) == (80, 40, 1, (50, 30))
    assert (padded.tokens, padded.trained, padded.rows) == (100, 40, 2)  # padded to the longest of the batch
    assert packed.attention_keys() == pytest.approx((50**2 + 30**2) / 80)  # each query sees its own example


def test_plan_grows_with_tokens_and_suggests_what_fits():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    shape = model_shape(cfg, "all-linear", 16)
    assert 130e6 < shape.params < 140e6  # SmolLM2-135M
    small = plan_memory(shape, weight_dtype="bfloat16", device="cpu", tokens=1000, trained=500, available=2**40)
    big = plan_memory(shape, weight_dtype="bfloat16", device="cpu", tokens=8000, trained=4000, available=2**40)
    assert big.total > small.total and big.parts["weights"] == small.parts["weights"] == shape.params * 2
    assert isinstance(small, MemoryPlan) and small.fits

    from ayar.config import load_config

    train_cfg = load_config(
        None, ["training.batch_size=16", "data.max_length=512", "training.packing=true", "training.rows_per_pass=16"]
    )
    exs = [Example([1] * 500, [1] * 250, "x") for _ in range(64)]
    p = largest_pass(exs, 16, True)
    limit = plan_memory(
        shape, weight_dtype="bfloat16", device="cpu", tokens=p.tokens // 3, trained=p.trained // 3, available=2**40
    ).total
    plan = plan_memory(
        shape, weight_dtype="bfloat16", device="cpu", tokens=p.tokens, trained=p.trained, available=limit
    )
    assert not plan.fits
    layout = predicted_layout(shape, train_cfg, "cpu")
    assert layout.packed and layout.fused and not layout.checkpointing  # SmolLM2 is a Llama: the fused decoder
    fixes = suggestions(shape, train_cfg, exs, "bfloat16", "cpu", limit, layout)
    # each a single change that fits a third of the memory; the effective batch is kept
    assert fixes[:3] == [
        "training.gradient_checkpointing=true (recomputes each layer's forward in backward: ~30% slower)",
        "training.rows_per_pass=2 (same batches and gradient, in smaller passes)",
        "training.batch_size=4 training.grad_accum=4 (same effective batch)",
    ]
    assert any(f.startswith("data.max_length=") for f in fixes)


def test_checkpointing_and_the_fused_decoder_cut_planned_activations():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    shape = model_shape(cfg, "all-linear", 16)
    acts = lambda **kw: plan_memory(
        shape, weight_dtype="float32", device="cpu", tokens=1000, trained=500, available=2**40, attention_keys=200, **kw
    ).parts["activations"]
    modules, fused, ckpt = acts(), acts(fused=True), acts(fused=True, checkpointing=True)
    assert ckpt < fused / 5 < modules / 5  # checkpointing keeps each layer's input and one layer's activations (twice)


def test_plan_cli(tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    args = [sys.executable, "-m", "ayar", "plan", f"model.name={tiny_model_dir}", f"data.train={data}", "--json"]
    r = subprocess.run(args, capture_output=True, text=True)
    plan = json.loads(r.stdout)
    assert r.returncode == 0 and plan["fits"] and plan["tokens"] > 0 and plan["total"] > plan["parts"]["runtime"]
    r = subprocess.run(
        args[:-1], capture_output=True, text=True, env={**__import__("os").environ, "AYAR_MEMORY_LIMIT_MB": "100"}
    )
    assert r.returncode == 1 and "does NOT fit" in r.stdout


def test_train_stops_before_the_first_step_when_memory_cannot_fit(tiny_model_dir, tmp_path, monkeypatch):
    from ayar.errors import AyarError
    from ayar.training.sft import train_sft
    from tests.helpers import tiny_train_config

    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    cfg = tiny_train_config(tiny_model_dir, data, tmp_path / "runs", max_steps=1)
    monkeypatch.setenv("AYAR_MEMORY_LIMIT_MB", "50")
    with pytest.raises(
        AyarError, match=r"(?s)predicted peak memory .* exceeds the 0.0 GB available.*training.memory_check=warn"
    ):
        train_sft(cfg)
    cfg.training.memory_check = "warn"
    assert train_sft(cfg).read_meta()["status"] == "completed"


def test_bench_train_runs_both_sides_on_the_same_batches(tiny_model_dir, tmp_path):
    """The harness, end to end on a tiny model: each side in its own process, identical real tokens per
    step (same rows, same order), losses close, ratios computed. Timings are reported, never asserted."""
    from ayar.config import load_config
    from ayar.perf.bench_train import run_bench

    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 3)
    cfg = load_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            "model.dtype=float32",
            f"data.train={data}",
            "data.max_length=64",
            "training.batch_size=4",
            "training.warmup_ratio=0",
            "lora.dropout=0",
        ],
    )
    result = run_bench(cfg, steps=3, warmup=1, rows=36, log=lambda m: None)
    a, t = result["sides"]["ayar"], result["sides"]["trl"]
    assert a["real_tokens_per_step"] == t["real_tokens_per_step"] > 0
    assert len(a["losses"]) == len(t["losses"]) == 3
    assert a["losses"][0] == pytest.approx(t["losses"][0], rel=0.05)  # same batch, same masking, before any update
    assert set(result["ratios"]) == {"tokens_per_s", "peak_rss", "median_step", "final_loss"}
    # in turns after the first step: no timed step of one side overlaps one of the other's
    assert result["lockstep"] and len(a["step_spans"]) == len(t["step_spans"]) == 3
    spans = sorted(a["step_spans"][1:] + t["step_spans"][1:])
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "modules"])
def test_auto_checkpointing_turns_on_only_when_needed_and_changes_no_loss(tmp_path, monkeypatch, fused):
    """With memory for the checkpointed plan but not the plain one, `ayar train` checkpoints by itself; the
    losses (dropout on: the recomputed forward must redraw the same masks; per-example attention: the
    recomputation must take it too) equal a run without it."""
    import dataclasses

    from ayar.training import memory as planner
    from ayar.training.plan import plan_for_config
    from ayar.training.sft import train_sft
    from tests.helpers import save_tiny, tiny_train_config

    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 2)
    # enough layers for checkpointing to pay (it keeps each layer's input, and one layer's activations twice)
    model_dir = save_tiny(tmp_path / "m", "qwen2", num_hidden_layers=6)
    cfg = tiny_train_config(model_dir, data, tmp_path / "runs", max_steps=3, batch_size=8)
    cfg.data.lint = "warn"
    cfg.lora.dropout = 0.1
    cfg.training.fused = fused
    totals = {}
    for ckpt in (False, True):
        c = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, gradient_checkpointing=ckpt))
        totals[ckpt] = plan_for_config(c, log=lambda m: None)[0].total
    assert totals[True] < totals[False]
    monkeypatch.setattr(planner, "available_memory", lambda device: (totals[True] + totals[False]) // 2)
    monkeypatch.setattr("ayar.training.sft.tune_allocator", lambda: "tuned")  # process-wide: not in the test process
    auto = train_sft(cfg)
    assert auto.read_meta()["passes"]["gradient_checkpointing"] and auto.read_meta()["passes"]["fused"] == fused
    assert auto.read_meta()["allocator"] == "tuned"  # a tight plan: freed memory is returned at once
    cfg.training.gradient_checkpointing, cfg.training.memory_check = False, "off"
    plain = train_sft(cfg)
    assert not plain.read_meta()["passes"]["gradient_checkpointing"] and plain.read_meta()["allocator"] is None
    losses = lambda run: [r["loss"] for r in run.read_metrics() if "loss" in r]
    assert len(losses(auto)) == 3 and losses(auto) == pytest.approx(losses(plain), rel=1e-5)


_ALLOCATOR_CHECK = """
import psutil, torch
from ayar.training.allocator import tune_allocator
print(tune_allocator())
rss = lambda: psutil.Process().memory_info().rss
for _ in range(3):  # what raises glibc's dynamic threshold: freeing large blocks
    big = torch.ones(16 * 2**20 // 4)
    del big
before = rss()
blocks = [torch.ones(4 * 2**20 // 4) for _ in range(50)]  # 200 MB of 4 MB tensors
during = rss()
del blocks
print(during - before, rss() - before)
"""


def test_the_allocator_setting_returns_freed_tensors_to_the_system():
    """After tune_allocator, a freed multi-MB tensor gives its memory back (glibc's default would keep
    it on the heap once its dynamic threshold rose). In its own process: the setting is process-wide."""
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator setting applies to glibc on Linux only")
    out = subprocess.run(
        [sys.executable, "-c", _ALLOCATOR_CHECK], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert "glibc" in out[0]
    grew, kept = map(int, out[1].split())
    assert grew > 150 * 2**20 and kept < 30 * 2**20


_PEAK_CHECK = """
import subprocess, sys
parent = bytearray(600 * 2**20)
parent[::4096] = b"x" * len(parent[::4096])  # touched: 600 MB resident in this process
child = "from ayar.training.allocator import peak_rss_mb; print(peak_rss_mb())"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
"""


def test_the_peak_rss_a_run_records_is_its_own_not_its_parents():
    """A process started by a larger one (a run from the web UI, or from a benchmark that built a model) records its
    own peak: getrusage's ru_maxrss would carry the 600 MB its parent held when it forked."""
    import platform

    if platform.system() != "Linux":
        pytest.skip("the carried-over peak is Linux's")
    out = subprocess.run([sys.executable, "-c", _PEAK_CHECK], capture_output=True, text=True, check=True).stdout
    assert 5 < float(out) < 300, out


_PHASES = """
from ayar.training import allocator
setup = bytearray(400 * 2**20)
setup[::4096] = b"x" * len(setup[::4096])  # setup touches 400 MB and lets them go
del setup
allocator.start_of_training()
training = bytearray(200 * 2**20)
training[::4096] = b"x" * len(training[::4096])
print(allocator.setup_peak_rss_mb(), allocator.training_peak_rss_mb(), allocator.peak_rss_mb())
del training
allocator.start_of_setup()  # a second run in the same process (an HPO trial): its setup is its own
allocator.start_of_training()
print(allocator.setup_peak_rss_mb(), allocator.peak_rss_mb())
"""


def test_setups_peak_memory_is_kept_apart_from_trainings():
    """run.json's `training_peak_rss_mb` is what the memory planner predicts: a larger peak while setting up (a
    checkpoint converted to another dtype as it loads) stays out of it, and in `peak_rss_mb`. A second run in the
    same process (an HPO trial) measures its own setup."""
    import platform

    if platform.system() != "Linux":
        pytest.skip("the high-water mark is reset through Linux's /proc")
    out = subprocess.run([sys.executable, "-c", _PHASES], capture_output=True, text=True, check=True).stdout
    first, second = out.splitlines()
    setup, training, peak = map(float, first.split())
    assert setup > training + 150 and peak == setup, out  # setup's 400 MB against training's 200
    assert training > 200, out
    second_setup, process_peak = map(float, second.split())
    assert second_setup < training - 150 and process_peak >= peak, out  # not the first run's; the process's kept


_RESTACK = """
import ctypes, json, sys, torch
from ayar.config import LoraConfig
from ayar.kernels import fused_decoder
from ayar.models.adapters import apply_method
from ayar.models.device import Placement
from ayar.models.load import load_model

def anon_mb():
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what is held, not what glibc keeps for later
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1024

model = load_model(sys.argv[1], Placement("cpu", getattr(torch, sys.argv[2]), ""))
sum(float(p.float().sum()) for p in model.parameters())  # every page of the weights in memory
model = apply_method(model, "lora", LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear"))
before = anon_mb()
assert fused_decoder.usable(model, "cpu")  # restacks q/k/v and gate/up
print(json.dumps(anon_mb() - before))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_fused_decoders_weight_stacks_are_planned_only_where_they_add_memory(tmp_path, dtype):
    """The fused decoder restacks q/k/v and gate/up into one tensor each and the modules' weights become views of it.
    Weights loaded in the dtype they are stored in are the file's mapped pages, which stay: the stacks are new memory.
    Weights converted as they load (an fp32 checkpoint trained in bf16) are the process's own, freed as the stacks
    replace them: nothing added. Measured in a fresh process (anonymous RSS, glibc's kept heap trimmed), against the
    plan's "fused weight stacks"; a model big enough that its stacks (33 MB in bf16) dwarf the process's own
    allocations around the restack (with 9 MB stacks, the bf16 case once measured over its 1.3 MB bound in a
    parallel test run)."""
    import platform

    from transformers import AutoConfig

    from ayar.models.load import stored_dtype
    from tests.helpers import save_tiny

    if platform.system() != "Linux":
        pytest.skip("anonymous RSS is read from Linux's /proc")
    dims = dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=6
    )
    path = save_tiny(tmp_path / "model", "llama", **dims)  # stored in fp32
    run = [sys.executable, "-c", _RESTACK, str(path), dtype]
    added = json.loads(subprocess.run(run, capture_output=True, text=True, check=True).stdout) * 2**20
    stored = str(stored_dtype(str(path))).removeprefix("torch.")
    shape = model_shape(AutoConfig.from_pretrained(path), "all-linear", 8, stored)
    plan = plan_memory(shape, weight_dtype=dtype, device="cpu", tokens=64, trained=32, fused=True, available=2**40)
    stacks = 4 * 768 * (768 + 2 * 384 + 2 * 2048) * (4 if dtype == "float32" else 2)
    if dtype == "float32":  # loaded as stored
        assert plan.parts["fused weight stacks"] == stacks and added == pytest.approx(stacks, rel=0.15)
    else:
        assert "fused weight stacks" not in plan.parts and added < 0.15 * stacks, added


def saved_bytes(model, batch: dict, fused: bool, head: bool = False, autocast=None) -> int:
    """Bytes autograd keeps for backward over one pass of `batch` (saved-tensor hooks; unique storages, weights
    aside), run as training runs it (a half-precision base: adapters under autocast; `autocast`: a full fine-tune's
    compute dtype over fp32 weights); `head`: through the output head too."""
    from ayar.training.loss import _hidden, compute_context

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with compute_context(model, autocast), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = _hidden(model, batch, fused)
        if head:
            model.get_output_embeddings()(hidden)
    return sum(saved.values())


def traced_pass(dtype, method: str, targets, dropout: float, long: bool, monkeypatch):
    """A tiny llama under `method` (adapters on `targets`), a packed pass of three examples (220 tokens), and
    the planner's `Pass` for it; `long`: every segment through torch's attention kernel (no saved probabilities)."""
    from ayar.config import LoraConfig
    from ayar.data.collate import collate
    from ayar.kernels import fused_decoder, varlen
    from ayar.models.adapters import apply_method
    from ayar.training.memory import Pass

    if long:
        monkeypatch.setattr(varlen, "MATMUL_MAX_LEN", 8)
    monkeypatch.setattr(fused_decoder, "QUERY_BLOCK", 32)  # the fused decoder's segments in 2-3 query blocks
    tok = make_tokenizer("llama")
    dims = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2
    )
    model = apply_method(
        make_model("llama", tok, **dims).to(dtype),
        method,
        LoraConfig(r=8, alpha=16, dropout=dropout, target_modules=targets),
    ).train()
    g = torch.Generator().manual_seed(0)
    rows = [
        Example(ids, ids, str(i))
        for i, ids in enumerate(torch.randint(5, len(tok), (n,), generator=g).tolist() for n in (90, 70, 60))
    ]
    return model, collate(rows, tok.pad_token_id, packing=True), Pass(220, 220, 1, (90, 70, 60))


@pytest.mark.parametrize(
    "dtype,fused,dropout,long",
    [
        *[("float32", *case) for case in [(True, 0.1, False), (True, 0.1, True), (False, 0.1, False)]],
        *[("float32", *case) for case in [(False, 0.0, False), (False, 0.0, True)]],
        *[("bfloat16", *case) for case in [(True, 0.1, False), (False, 0.1, False), (False, 0.0, False)]],
        ("bfloat16", False, 0.1, True),
        *[(dtype, False, None, long) for dtype in ("float32", "bfloat16") for long in (False, True)],
    ],
)
def test_planned_activations_match_what_autograd_saves(dtype, fused, dropout, long, monkeypatch):
    """The planner's activation bytes (per-layer terms, attention probabilities) against the bytes autograd
    actually keeps for backward in one packed pass, counted by saved-tensor hooks (unique storages), over an fp32
    and a bf16 base. `long`: every segment through torch's attention kernel; `dropout` None: a full fine-tune (every
    weight trained, the output head's pass included) as training runs it, fp32 weights and in bf16 under autocast,
    which keeps each weight's bf16 copy besides."""
    from ayar.kernels import fused_decoder
    from ayar.training.loss import _hidden
    from ayar.training.memory import activation_bytes_per_token, autocast_weight_copies

    dtype, full = getattr(torch, dtype), dropout is None
    weights, autocast = (torch.float32, dtype if dtype != torch.float32 else None) if full else (dtype, None)
    model, batch, p = traced_pass(weights, "full" if full else "lora", "all-linear", dropout or 0.0, long, monkeypatch)
    assert fused_decoder.usable(model, "cpu") != full  # full fine-tuning trains on modules
    _hidden(model, batch, fused)  # a first pass builds the fused decoder's weight stacks: parameters from here on
    measured = saved_bytes(model, batch, fused, head=full, autocast=autocast)
    shape = model_shape(model.config, "all-linear", 8)
    keys = p.attention_keys(blocked=fused)
    planned = 220 * activation_bytes_per_token(
        shape, dtype.itemsize, not full, bool(dropout), fused, keys, long_share=p.long_share()
    )
    planned += autocast_weight_copies(shape, dtype.itemsize) if autocast else 0
    # the fused decoder's long path keeps copies whose share is larger at these small dimensions (+9.5 % here)
    assert planned == pytest.approx(measured, rel=0.12 if fused and long else 0.04)


@pytest.mark.parametrize(
    "dtype,dropout,long",
    [("bfloat16", 0.0, False), ("bfloat16", 0.1, False), ("bfloat16", 0.1, True), ("float16", 0.1, False)],
)
def test_planned_qlora_activations_match_what_autograd_saves(dtype, dropout, long, monkeypatch, tmp_path):
    """QLoRA over a bf16 base keeps bf16 activations (its rest stays bf16, as a bf16 LoRA run's), over an fp16 base
    fp32 ones (its norms and embeddings go to fp32, so does the residual stream); the 4-bit matmuls keep nothing but
    their packed weight: the planner's activation bytes for method qlora against the bytes autograd keeps in one
    packed pass of the 4-bit model; DeepSpeed ZeRO-3's linear adds nothing to it (`zero3_linear_inputs` 0)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from ayar.config import LoraConfig
    from ayar.models.adapters import apply_method, quantization_config
    from ayar.training.memory import activation_bytes, activation_bytes_per_token

    weights = getattr(torch, dtype)
    model, batch, p = traced_pass(weights, "lora", "all-linear", dropout, long, monkeypatch)
    model.merge_and_unload().save_pretrained(tmp_path / "base")
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quantization_config("qlora", weights), dtype=weights
    )
    lora = LoraConfig(r=8, alpha=16, dropout=dropout, target_modules="all-linear")
    quantized = apply_method(quantized, "qlora", lora).train()
    measured = saved_bytes(quantized, batch, fused=False)
    shape = model_shape(quantized.config, "all-linear", 8)
    kept = activation_bytes("qlora", dtype)
    assert kept == (2 if dtype == "bfloat16" else 4)
    planned = 220 * activation_bytes_per_token(
        shape, kept, True, dropout > 0, attention_keys=p.attention_keys(), long_share=p.long_share()
    )
    assert planned == pytest.approx(measured, rel=0.04)
    # under ZeRO-3 DeepSpeed's linear keeps every input it sees, but a 4-bit layer never calls F.linear: nothing added
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from ayar.training.memory import zero3_linear_inputs

    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    assert zero3_linear_inputs(shape, 220, dtype, dropout > 0, False, "qlora") == 0
    under_zero3 = saved_bytes(quantized, batch, fused=False)
    # nothing added; in bf16 DeepSpeed's function keeps no autocast copies of the adapters' weights (2 % less here)
    assert measured * 0.97 < under_zero3 <= measured * 1.01


@pytest.mark.parametrize(
    "dtype,targets,dropout,long",
    [
        ("float32", "all-linear", 0.1, False),
        ("float32", "q_proj,v_proj", 0.0, True),
        ("float32", "q_proj,v_proj", 0.1, False),
        ("bfloat16", "all-linear", 0.1, True),
        ("bfloat16", "all-linear", 0.0, False),
        ("bfloat16", "q_proj,v_proj", 0.0, False),
        ("bfloat16", "q_proj,v_proj", 0.1, True),
    ],
)
def test_planned_zero3_linear_inputs_match_what_deepspeeds_linear_keeps(dtype, targets, dropout, long, monkeypatch):
    """Under ZeRO-3 DeepSpeed replaces torch's linear (zero.Init, which ayar builds the model under, leaves its own in
    place: deepspeed/runtime/zero/linear.py), and its autograd function keeps every linear layer's input, frozen or
    not. The planner's activations plus its ZeRO-3 term against the bytes kept by one packed pass through it, with
    adapters on every linear layer or on some, with and without dropout."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from ayar.training.memory import activation_bytes_per_token, zero3_linear_inputs

    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    dtype, targets = getattr(torch, dtype), targets if targets == "all-linear" else targets.split(",")
    model, batch, p = traced_pass(dtype, "lora", targets, dropout, long, monkeypatch)
    measured = saved_bytes(model, batch, fused=False)
    shape = model_shape(model.config, targets, 8)
    planned = 220 * activation_bytes_per_token(
        shape, dtype.itemsize, True, dropout > 0, attention_keys=p.attention_keys(), long_share=p.long_share()
    )
    weights = str(dtype).removeprefix("torch.")
    planned += zero3_linear_inputs(shape, 220, weights, dropout > 0, checkpointing=False)
    assert planned == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("fused,opening", [(True, 0), (False, 0), (True, 48)])
def test_the_plan_takes_the_pass_that_keeps_the_most_not_the_longest(fused, opening, monkeypatch):
    """Per-example attention keeps the probabilities of segments up to MATMUL_MAX_LEN and none of longer ones: a pass
    of shorter examples can keep more than the longest examples do. The bytes autograd keeps (saved-tensor hooks) for
    passes of the j longest examples above the bound and the longest below it, j = 0..4: the planner's pass is the one
    that keeps the most. `opening`: the examples share one, which the fused decoder computes once per pass (the bound
    then applies to what follows it)."""
    from ayar.config import LoraConfig, load_config
    from ayar.data.collate import collate
    from ayar.data.render import IGNORE
    from ayar.kernels import fused_decoder, varlen
    from ayar.models.adapters import apply_method
    from ayar.training.loss import _hidden
    from ayar.training.memory import Layout, plan_layout

    monkeypatch.setattr(varlen, "MATMUL_MAX_LEN", 96)
    monkeypatch.setattr(fused_decoder, "QUERY_BLOCK", 32)
    tok = make_tokenizer("llama")
    dims = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4
    )
    model = apply_method(
        make_model("llama", tok, **dims), "lora", LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    ).train()
    g = torch.Generator().manual_seed(0)
    start = torch.randint(5, len(tok), (opening,), generator=g).tolist()
    lengths = [n + opening for n in (100, 99, 98, 97, 96, 95, 94, 93, 30)]  # four long, four short, one shorter
    examples = []
    for n in lengths:
        ids = start + torch.randint(5, len(tok), (n - opening,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE] * (opening + 2) + ids[opening + 2 :], str(n)))

    def kept(rows) -> int:
        return saved_bytes(model, collate(rows, tok.pad_token_id, packing=True, share_prefix=fused), fused)

    _hidden(model, collate(examples[:1], tok.pad_token_id, packing=True), fused)  # the fused decoder's weight stacks
    passes = [examples[:j] + examples[4 : 8 - j] for j in range(5)]
    measured = {sum(len(e.input_ids) - opening for e in rows) + opening: kept(rows) for rows in passes}
    heaviest = max(measured, key=measured.get)
    assert heaviest != sum(lengths[:4]) - 3 * opening  # not the longest examples
    cfg = load_config(None, ["training.batch_size=4", f"training.fused={str(fused).lower()}", "lora.dropout=0"])
    shape = model_shape(model.get_base_model().config, "all-linear", 4)
    plan = plan_layout(shape, cfg, examples, "float32", "cpu", Layout(4, True, fused), available=2**40)
    assert plan.tokens == heaviest, measured
    assert plan.parts["activations"] == pytest.approx(measured[heaviest], rel=0.05)


def test_the_bf16_module_path_counts_what_dropout_adds_as_autograd_keeps_it():
    """Over a bf16 base the adapters compute on their input as it is (training/loss.py `compute_context`, also a
    Trainer stage's): without dropout q/k/v (and gate/up) keep one input between them; with ayar's CPU dropout each
    adapter keeps its own dropped-out copy and no mask. The planner's dropout term against the bytes autograd keeps
    besides (saved-tensor hooks, unique storages)."""
    from ayar.config import LoraConfig
    from ayar.data.collate import collate
    from ayar.models.adapters import apply_method
    from ayar.training.loss import _hidden, compute_context
    from ayar.training.memory import layer_bytes_per_token

    tok = make_tokenizer("llama")
    dims = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    )
    g = torch.Generator().manual_seed(0)
    rows = [
        Example(ids, ids, str(i)) for i, ids in enumerate(torch.randint(5, len(tok), (2, 80), generator=g).tolist())
    ]
    batch = collate(rows, tok.pad_token_id, packing=False)
    kept = {}
    for dropout in (0.0, 0.1):
        torch.manual_seed(0)
        base = make_model("llama", tok, **dims).to(torch.bfloat16)
        model = apply_method(base, "lora", LoraConfig(r=8, alpha=16, dropout=dropout, target_modules="all-linear"))
        model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params and t.dtype == torch.bfloat16 and t.dim() >= 2:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with compute_context(model), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _hidden(model, batch, False)
        kept[dropout] = sum(saved.values())
    shape = model_shape(model.get_base_model().config, "all-linear", 8)
    per_layer = lambda dropout: layer_bytes_per_token(shape, 2, True, dropout)  # noqa: E731
    planned = 160 * shape.layers * (per_layer(True) - per_layer(False))
    assert planned == pytest.approx(kept[0.1] - kept[0.0], rel=0.02), (planned, kept)


def test_importing_ayar_bounds_onednn_caches_of_new_matmul_shapes():
    # bf16 matmuls on CPU go through oneDNN, which caches a compiled primitive per shape; padding-free
    # training meets new shapes every pass, and with torch's default (1,024 per cache) a run's memory grew
    # ~36 MB a pass. ayar caps the caches at 128 (ayar/__init__.py): past the first few hundred shapes, memory is
    # flat (on a Sapphire Rapids CPU it still grew 19 MB from the 300th to the 400th shape, flat from there;
    # uncapped it grows ~65 MB every 100).

    from ayar.models.device import cpu_supports_bf16

    if not (cpu_supports_bf16() and torch.backends.mkldnn.is_available()):
        pytest.skip("bf16 matmuls do not run through oneDNN on this CPU")
    script = """
import ayar, torch
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
w = torch.randn(64, 64, dtype=torch.bfloat16)
for n in range(1, 901):
    torch.mm(torch.randn(n, 64, dtype=torch.bfloat16), w)
    if n == 500: at500 = rss()
print(rss() - at500)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    grew = float(
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True).stdout
    )
    assert grew < 20, f"{grew:.0f} MB more after 400 more matmul shapes"  # uncapped: ~260 MB


# --- a target that is not this machine (`ayar plan --device cuda --gpu-memory ... --nproc ... --strategy ...`) ---

LLAMA_8B = {  # Llama 3.1 8B's published dimensions: a config.json alone, no weights, no tokenizer
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}


@pytest.fixture
def config_only(tmp_path):
    folder = tmp_path / "llama-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_8B))
    return folder


def test_per_rank_shards_what_each_strategy_shards():
    from ayar.training.memory import Shape, Sharding, per_rank

    shape = Shape(params=8_000, layers=4, hidden=8, intermediate=16, kv=8, vocab=32, lora_params=100)
    full = MemoryPlan(
        {"weights": 32_000, "gradients (full)": 32_000, "AdamW (full)": 64_000, "activations": 500}, 10**6
    )
    lora = MemoryPlan({"weights": 16_000, "adapter + grads + AdamW": 1_600, "activations": 500}, 10**6)
    assert per_rank(full, shape, Sharding(1)).parts == full.parts  # one process: nothing changes
    ddp = per_rank(full, shape, Sharding(4, "ddp")).parts
    assert ddp["weights"] == 32_000 and ddp["gradient all-reduce buffer"] == 8_000 * 4
    z2 = per_rank(full, shape, Sharding(4, "zero2")).parts
    assert z2["weights"] == 32_000 and z2["gradients (full)"] == 8_000 and z2["AdamW (full)"] == 16_000
    assert z2["activations"] == 500
    offloaded = per_rank(full, shape, Sharding(4, "fsdp", offload=True))
    assert offloaded.offloaded == (32_000 + 32_000 + 64_000) // 4 and not {"gradients (full)", "AdamW (full)"} & set(
        offloaded.parts
    )
    z3 = per_rank(full, shape, Sharding(4, "zero3"), zero3_inputs=700).parts
    # DeepSpeed's defaults keep every weight of a model under 1e9 parameters gathered from forward to backward, and
    # its linears keep their inputs
    assert z3["weights"] == 8_000 and z3["gathered weights (ZeRO-3)"] == 32_000
    assert z3["linear inputs (ZeRO-3)"] == 700
    large = Shape(params=4 * 10**9, layers=32, hidden=8, intermediate=16, kv=8, vocab=32, lora_params=100)
    big = MemoryPlan({"weights": 8 * 10**9, "adapter + grads + AdamW": 1_600, "activations": 500}, 10**12)
    assert per_rank(big, large, Sharding(8, "zero3")).parts["gathered weights (ZeRO-3)"] == 2 * 10**9  # 1e9 of 4e9
    # FSDP2 keeps its root unit (here 2,000 weights outside the layers' linears) gathered through the step
    with_linears = Shape(params=8_000, layers=4, hidden=8, intermediate=16, kv=8, vocab=32, lora_params=100,
                         linear_params=6_000)  # fmt: skip
    assert per_rank(full, with_linears, Sharding(4, "fsdp")).parts["gathered layers + root unit"] == 4 * (
        2 * 6_000 // 4 + 2_000
    )
    off = per_rank(lora, shape, Sharding(2, "fsdp", offload=True))
    assert "weights" not in off.parts and off.offloaded == 16_000 // 2 + (100 * 8 + 100 * 4) // 2
    assert off.parts["adapter + grads + AdamW"] == 1_600 // 2 - (100 * 8 + 100 * 4) // 2
    assert "per rank of 2 (fsdp" in off.per_rank and "offloaded" in off.table()


def test_plan_a_gpu_this_machine_does_not_have_from_a_config_alone(config_only, capsys):
    from ayar.cli import main

    def plan(*args):
        code = main(["plan", f"model.name={config_only}", "data.max_length=2048", "training.batch_size=1", *args])
        return code, json.loads(capsys.readouterr().out)

    code, qlora = plan("method=qlora", "lora.r=32", "--device", "cuda", "--gpu-memory", "24GB", "--json")
    assert code == 0 and qlora["fits"] and qlora["device"] == "cuda" and qlora["available"] == 24 * 2**30
    assert qlora["tokens"] == 2048 and "worst case" in qlora["notes"][-1]  # no tokenizer: rows of max_length
    assert 4 * 2**30 < qlora["parts"]["weights"] < 7 * 2**30  # 4-bit linears + bf16 embeddings and head
    assert not any("4-bit base" in note for note in qlora["notes"])
    # QLoRA split by FSDP: rank 0 loads the whole 4-bit base first (setup, beside the plan), each process keeps half
    code, split = plan("method=qlora", "lora.r=32", "--device", "cuda", "--gpu-memory", "24GB", "--nproc", "2",
                       "--strategy", "fsdp", "--json")  # fmt: skip
    whole = f"({qlora['parts']['weights'] / 2**30:.2f} GB)"
    assert f"rank 0 first loads the whole 4-bit base into CPU RAM {whole} and sends the other" in split["notes"][0]
    assert split["parts"]["weights"] < 0.6 * qlora["parts"]["weights"]  # the quant states stay whole in each
    # loading on every rank asked under FSDP, or under ZeRO-3: each process loads it
    for loading, strategy, where in (("every_rank", "fsdp", "into CPU RAM"), ("auto", "zero3", "onto its device")):
        code, split = plan("method=qlora", f"distributed.loading={loading}", "--device", "cuda", "--gpu-memory",
                           "24GB", "--nproc", "2", "--strategy", strategy, "--json")  # fmt: skip
        assert f"each of the 2 processes first loads the whole 4-bit base {where}" in split["notes"][0]
    code, full = plan("method=full", "--device", "cuda", "--gpu-memory", "80GB", "--json")
    assert code == 1 and not full["fits"] and full["parts"]["weights"] > 29 * 2**30  # fp32 master weights
    code, sharded = plan("method=full", "--device", "cuda", "--gpu-memory", "80GB", "--nproc", "8", "--strategy",
                         "zero3", "--json")  # fmt: skip
    assert code == 0 and sharded["parts"]["weights"] == pytest.approx(full["parts"]["weights"] / 8, rel=1e-6)
    assert "per rank of 8 (zero3" in sharded["per_rank"]
    import ayar
    from ayar.training.memory import Sharding
    from ayar.training.plan import Target

    overrides = {"model__name": str(config_only), "data__max_length": 2048, "training__batch_size": 1}
    same = ayar.plan(method="full", target=Target("cuda", 80 * 2**30, Sharding(8, "zero3")), **overrides)
    assert same.fits and same.memory.total == sharded["total"]  # the Python API answers as the command does


def test_processes_planned_on_this_cpu_share_its_memory(config_only, capsys):
    """`ayar plan --nproc 2` without a GPU: each process gets half this machine's RAM, as a run with
    `--nproc 2` plans it (training/plan.py _check_memory)."""
    from ayar.cli import main
    from ayar.training.memory import available_memory

    code = main(["plan", f"model.name={config_only}", "training.batch_size=1", "--nproc", "2", "--strategy", "fsdp",
                 "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == (0 if out["fits"] else 1) and out["device"] == "cpu" and "per rank of 2 (fsdp" in out["per_rank"]
    assert out["available"] == pytest.approx(available_memory("cpu") / 2, rel=0.1)


def test_processes_are_planned_as_the_strategy_runs_them(config_only, capsys):
    """`ayar plan --nproc 2`: FSDP and DeepSpeed run the model's own modules (training/plan.py `not_fused_because`), so
    their plans do not take the fused decoder, which DDP's does; without --strategy the config's `distributed`
    section says how the processes share the model, as `ayar train --nproc 2` would run it."""
    from ayar.cli import main

    def planned(*args: str) -> dict:
        overrides = [a for a in args if "=" in a]
        flags = [a for a in args if "=" not in a]
        common = [f"model.name={config_only}", "training.batch_size=1", "data.max_length=256", *overrides]
        main(["plan", *common, "--nproc", "2", *flags, "--json"])
        out = json.loads(capsys.readouterr().out)
        del out["available"]  # this machine's free memory, which moves between two calls
        return out

    ddp = planned("--strategy", "ddp")
    assert ddp["layout"]["fused"] and "fused weight stacks" in ddp["parts"]
    for strategy in ("fsdp", "zero2", "zero3"):
        sharded = planned("--strategy", strategy)
        assert not sharded["layout"]["fused"] and "fused weight stacks" not in sharded["parts"], strategy
        assert f"per rank of 2 ({strategy}" in sharded["per_rank"]
    assert planned("distributed.strategy=fsdp") == planned("--strategy", "fsdp")
    zero3 = planned("distributed.strategy=deepspeed", "distributed.zero_stage=3", "distributed.offload=true")
    assert zero3 == planned("--strategy", "zero3", "--offload") and zero3["offloaded"] > 0
    # one process runs as one (the fused decoder), whatever the config's distributed section says
    main(["plan", f"model.name={config_only}", "training.batch_size=1", "distributed.strategy=fsdp", "--device",
          "cpu", "--json"])  # fmt: skip
    assert json.loads(capsys.readouterr().out)["layout"]["fused"]


def test_plan_target_refusals(config_only):
    from ayar.cli import main
    from ayar.cli.plan import memory_size

    assert memory_size("24GB") == 24 * 2**30 and memory_size("16000 MB") == 16000 * 2**20 and memory_size("1.5tb")
    assert main(["plan", f"model.name={config_only}", "--gpu-memory", "lots"]) == 2  # a clear error, no traceback
    if not torch.cuda.is_available():
        assert main(["plan", f"model.name={config_only}", "--device", "cuda"]) == 2  # how much memory: say it


# --- the Trainer stages (DPO family, reward, classification, GRPO) -------------------------------------------------


def _stage_config(model_dir, data, out, *overrides):
    from ayar.config import load_config

    return load_config(None, [f"model.name={model_dir}", "model.dtype=float32", f"data.train={data}",
                              f"output.dir={out}", "training.tracker=none", "data.val_ratio=0", "data.cache=false",
                              "training.max_steps=2", *overrides])  # fmt: skip


@pytest.mark.parametrize("stage", ["dpo", "kto", "reward", "classification"])
def test_a_trainer_stage_is_planned_on_the_batches_its_trainer_feeds(tiny_model_dir, tmp_path, stage):
    """One micro-batch holding every row: the planned rows and padded length are those of the batch the stage's
    Trainer builds (TRL's collators: chosen and rejected halves together, KTO's rows one completion each)."""
    from types import SimpleNamespace

    from ayar.data.dataset import load_splits
    from ayar.models.load import load_tokenizer
    from ayar.training import classify, preference, reward_model
    from ayar.training.plan import decide
    from ayar.training.trainer_plan import trainer_pass
    from ayar.training.trl_stage import training_kwargs
    from tests.unit.training.test_stages import PAIRS

    pairs = PAIRS[:6]
    texts = [{"text": p["prompt"] + " " + p[half], "label": half} for p in pairs for half in ("chosen", "rejected")]
    data = write_jsonl(tmp_path / "d.jsonl", texts if stage == "classification" else pairs)
    rows = {"dpo": 6, "kto": 12, "reward": 6, "classification": 12}[stage]
    overrides = {"dpo": ["stage=dpo"], "kto": ["stage=dpo", "preference.loss=kto"], "reward": ["stage=reward"],
                 "classification": ["task=classification", "data.format=classification"]}[stage]  # fmt: skip
    cfg = _stage_config(tiny_model_dir, data, tmp_path, f"training.batch_size={rows}", *overrides)
    tok = load_tokenizer(str(tiny_model_dir))
    splits = load_splits(cfg.data, seed=cfg.training.seed)
    planned = trainer_pass(cfg, tok, splits.train)
    module = {"dpo": preference, "kto": preference, "reward": reward_model, "classification": classify}[stage]
    kw = module.STAGE.model_kwargs(cfg, splits)
    auto = __import__("transformers").AutoModelForSequenceClassification if module.STAGE.auto_class else None
    model = (auto or __import__("transformers").AutoModelForCausalLM).from_pretrained(tiny_model_dir, **kw)
    model.config.pad_token_id = tok.pad_token_id
    args = training_kwargs(cfg, SimpleNamespace(checkpoints=tmp_path / "ckpt"), decide(cfg))
    trainer = module.STAGE.build(cfg, model, tok, splits, args, [])
    batch = next(iter(trainer.get_train_dataloader()))
    assert tuple(batch["input_ids"].shape) == (planned.rows, planned.row_len), planned
    assert planned.head == ("score" if stage in ("reward", "classification") else "fused")
    # the longest rows planned together when a batch holds fewer: never shorter than any batch the trainer makes
    half = trainer_pass(cfg, tok, splits.train, batch_size=rows // 2)
    assert half.rows == planned.rows // 2 and half.row_len == planned.row_len


def test_a_trainer_stages_plan_counts_its_head_and_pairs():
    """Per token, the same layers as ayar's modules path; past them, TRL's fused head on a CPU (fp32 copies of a tile
    2,048 entries wide, at most 4,096 positions), the whole logits (ORPO, SimPO), or nothing for a classifier."""
    from ayar.kernels import trl_head
    from ayar.training.memory import Shape, plan_trainer_memory

    shape = Shape(params=135_000_000, layers=30, hidden=576, intermediate=1536, kv=192, vocab=49152,
                  lora_params=4_884_480, heads=9, lora_inputs=5000, lora_distinct_inputs=2000, lora_outputs=112,
                  linear_params=100_000_000)  # fmt: skip
    plan = lambda head, rows=8, row_len=384, **kw: plan_trainer_memory(
        shape, weight_dtype="bfloat16", device="cpu", rows=rows, row_len=row_len, trained=500, head=head, **kw
    )  # noqa: E731
    fused, logits, score = plan("fused"), plan("logits"), plan("score")
    assert fused.parts["fused head (TRL)"] == trl_head.scratch_bytes(8 * 383, 49152, "cpu") + 8 * 383 * 576 * 4
    assert logits.parts["logits (trained tokens)"] == 8 * 384 * 49152 * 4 * 4 > fused.parts["fused head (TRL)"] * 10
    assert score.total < fused.total < logits.total and "fused head (TRL)" not in score.parts
    assert fused.parts["activations"] == score.parts["activations"] > 0  # the same layers for every head
    assert plan("score", rows=4).parts["activations"] * 2 == score.parts["activations"]
    assert plan("fused", checkpointing=True).parts["activations"] < fused.parts["activations"] / 3
    long = plan("fused", rows=16, row_len=1024)  # beyond TRL's 4,096 positions a tile: no larger scratch
    assert long.parts["fused head (TRL)"] - 16 * 1023 * 576 * 4 == trl_head.scratch_bytes(4096, 49152, "cpu")


def test_ayar_plan_plans_a_dpo_run_as_its_trainer_runs(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoConfig

    from ayar.cli import main
    from tests.unit.training.test_stages import PAIRS

    len_vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    args = ["plan", f"model.name={tiny_model_dir}", f"data.train={data}", "stage=dpo", "training.batch_size=4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "one pass per micro-batch, padded, transformers + peft modules" in out and "fused head (TRL)" in out
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layout"]["fused"] is False and plan["tokens"] % 8 == 0  # 8 rows: 4 pairs, both halves
    assert main([*args, "preference.loss=orpo", "--json"]) == 0
    orpo = json.loads(capsys.readouterr().out)["parts"]  # TRL's ORPO takes the whole logits
    assert "fused head (TRL)" not in orpo and orpo["logits (trained tokens)"] == plan["tokens"] * len_vocab * 16


def test_a_trainer_stage_stops_before_training_when_it_cannot_fit_and_recomputes_when_that_fits(tmp_path, monkeypatch):
    """Memory too small: a clear error before the first step, naming the way to train anyway. Enough
    with gradient checkpointing only: auto turns it on (run.json records it)."""
    from ayar.data.dataset import load_splits
    from ayar.errors import AyarError
    from ayar.models.load import load_tokenizer
    from ayar.training.plan import decide, shape_of
    from ayar.training.preference import STAGE
    from ayar.training.trainer_plan import plan_trainer, trainer_pass
    from ayar.training.trl_stage import run_stage
    from tests.helpers import save_tiny
    from tests.unit.training.test_stages import PAIRS

    model_dir = save_tiny(tmp_path / "tiny", num_hidden_layers=8)  # deep enough for checkpointing to keep less
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    cfg = _stage_config(model_dir, data, tmp_path / "runs", "stage=dpo", "training.batch_size=4")
    monkeypatch.setenv("AYAR_MEMORY_LIMIT_MB", "50")
    with pytest.raises(AyarError, match=r"(?s)predicted peak memory .* exceeds .*training.memory_check=warn"):
        run_stage(cfg, STAGE)
    from transformers import AutoConfig

    shape = shape_of(AutoConfig.from_pretrained(model_dir), cfg)  # as the run plans it
    records, tok, placement = load_splits(cfg.data).train, load_tokenizer(str(model_dir)), decide(cfg).placement
    p = trainer_pass(cfg, tok, records)
    plain = plan_trainer(shape, cfg, p, placement, 10**12).total
    recomputed = plan_trainer(shape, cfg, p, placement, 10**12, checkpointing=True).total
    assert recomputed < plain
    monkeypatch.setenv("AYAR_MEMORY_LIMIT_MB", str((plain + recomputed) / 2 / 2**20))
    meta = run_stage(cfg, STAGE).read_meta()
    assert meta["status"] == "completed" and meta["passes"]["gradient_checkpointing"] is True
    assert meta["plan"]["predicted_peak_bytes"] == recomputed


def test_a_trainer_stage_is_planned_for_a_gpu_from_a_config_alone(config_only, capsys):
    """No tokenizer, no weights: a DPO run's rows are all as long as data.max_length, both halves of each pair."""
    from ayar.cli import main

    args = ["plan", f"model.name={config_only}", "stage=dpo", "data.max_length=1024", "training.batch_size=2",
            "--device", "cuda", "--gpu-memory", "80GB", "--json"]  # fmt: skip
    assert main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (
        plan["tokens"] == 2 * 2 * 1024 and "no tokenizer" in plan["notes"][-1] and "fused head (TRL)" in plan["parts"]
    )
    # on a GPU TRL's Triton kernel folds its own tiles in place: the tile itself (bf16), not the CPU's fp32 copies
    assert plan["parts"]["fused head (TRL)"] == 4 * 1023 * 32768 * 2 + 4 * 1023 * 4096 * 4
