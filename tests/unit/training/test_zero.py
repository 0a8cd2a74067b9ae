"""DeepSpeed ZeRO (`distributed.strategy: deepspeed`, training/zero.py): the config ayar writes is accepted by
DeepSpeed's own config class; in 2 processes on this CPU (DeepSpeed's CPU accelerator, gloo) ayar's own loop under
ZeRO-2 / ZeRO-3 trains what one process trains, and resumes DeepSpeed's checkpoints; DPO under ZeRO-2 / ZeRO-3 trains
the adapter the data-parallel run trains."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import MATH_ROWS, write_jsonl
from tests.unit.training.test_distributed import (
    COMMON,
    _train,
    as_if_killed,
    assert_same_adapters,
    assert_same_training,
    losses,
)

ZERO3 = ("distributed.strategy=deepspeed", "distributed.zero_stage=3")


def _plan(world_size=2, dtype=torch.float32, device="cpu"):
    from ayar.models.device import Placement
    from ayar.training.plan import RunPlan

    return RunPlan(Placement(device, dtype, "test"), world_size=world_size, strategy="deepspeed")


@pytest.mark.parametrize("stage, offload", [(2, False), (3, False), (2, True), (3, True)])
def test_the_config_is_what_deepspeed_itself_accepts(stage, offload):
    from deepspeed.runtime.config import DeepSpeedConfig

    from ayar.config import load_config
    from ayar.training.zero import deepspeed_config

    cfg = load_config(
        None,
        ["stage=dpo", "distributed.strategy=deepspeed", f"distributed.zero_stage={stage}",
         f"distributed.offload={str(offload).lower()}", "training.batch_size=4", "training.grad_accum=2",
         "training.max_grad_norm=0.5"],
    )  # fmt: skip
    written = deepspeed_config(cfg.training, cfg.distributed, _plan(world_size=1, dtype=torch.bfloat16, device="cuda"))
    ds = DeepSpeedConfig(json.loads(json.dumps(written)))  # as read back from the JSON a user would keep
    assert ds.zero_optimization_stage == stage and ds.zero_enabled
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps, ds.train_batch_size) == (4, 2, 8)
    assert ds.gradient_clipping == 0.5 and ds.bfloat16_config.enabled and not ds.float16_config.enabled
    assert ds.zero_config.offload_optimizer is not None if offload else ds.zero_config.offload_optimizer is None
    assert (ds.zero_config.offload_param is not None) == (offload and stage == 3)
    if offload:  # pinned on a GPU; DeepSpeed's CPU Adam named for the Trainer stages, with TrainingArguments' values
        assert ds.zero_config.offload_optimizer.pin_memory
        assert written["optimizer"] == {
            "type": "AdamW", "params": {"lr": cfg.training.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8,
                                        "weight_decay": cfg.training.weight_decay},
        }  # fmt: skip
        on_cpu = deepspeed_config(cfg.training, cfg.distributed, _plan(world_size=1))
        assert not on_cpu["zero_optimization"]["offload_optimizer"]["pin_memory"]
    else:
        assert "optimizer" not in written
    # DeepSpeed's own consistency check: the global batch is micro-batch x accumulation x processes
    bad = {**written, "train_batch_size": 7}
    with pytest.raises(AssertionError, match="train_batch_size"):
        DeepSpeedConfig(bad)


def test_the_own_loop_plans_zero_and_a_missing_deepspeed_is_named(monkeypatch):
    import sys

    from ayar.config import load_config
    from ayar.errors import AyarError
    from ayar.training.plan import decide
    from ayar.training.zero import loop_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for stage in (2, 3):
        plan = decide(load_config(None, ["distributed.strategy=deepspeed", f"distributed.zero_stage={stage}"]))
        assert plan.strategy == "deepspeed" and plan.memory_strategy == f"zero{stage}"
        assert plan.summary()["zero_stage"] == stage
    # ZeRO-3 splits the weights: what needs them whole in one process is refused before loading, as under FSDP
    zero3 = ["distributed.strategy=deepspeed", "distributed.zero_stage=3"]
    # a 4-bit base is quantized by every process as it loads (then split), on the Trainer stages too
    for stage in ("sft", "reward"):
        plan = decide(load_config(None, [*zero3, "method=qlora", f"stage={stage}", "distributed.loading=auto"]))
        assert plan.quantized and plan.summary()["loading"] == "every_rank"
    with pytest.raises(
        AyarError, match="distributed.loading rank0 with method qlora under DeepSpeed ZeRO-3, stage sft: each"
    ):
        decide(load_config(None, [*zero3, "method=qlora", "distributed.loading=rank0"]))
    with pytest.raises(AyarError, match="lora.init pissa under deepspeed ZeRO-3: converting the adapter"):
        decide(load_config(None, [*zero3, "lora.init=pissa"]))
    assert decide(load_config(None, ["distributed.strategy=deepspeed", "lora.init=pissa"])).strategy == "deepspeed"
    # ZeRO-3 builds the model split as it loads where asked (auto: on GPUs), else every process loads it whole
    plan = decide(load_config(None, zero3))
    assert not plan.splits_while_loading and plan.summary()["loading"] == "every_rank"
    plan = decide(load_config(None, [*zero3, "distributed.loading=rank0"]))
    assert plan.splits_while_loading and plan.summary()["loading"] == "rank0"
    assert not decide(load_config(None, ["distributed.strategy=deepspeed"])).splits_while_loading  # ZeRO-2: whole
    with pytest.raises(AyarError, match="distributed.loading parts is FSDP's; under DeepSpeed ZeRO-3 the model is"):
        decide(load_config(None, [*zero3, "distributed.loading=parts"]))
    # fp16 compute needs loss scaling, which the own loop does not do under DeepSpeed: said before loading
    with pytest.raises(AyarError, match="does not scale the loss under DeepSpeed yet"):
        decide(load_config(None, ["distributed.strategy=deepspeed", "model.dtype=float16"]))
    assert not decide(load_config(None, ["distributed.strategy=deepspeed", "model.dtype=bfloat16"])).loss_scaling
    # offload, written for GPUs, runs on a CPU too; ayar's own loop then steps with DeepSpeed's CPU Adam (its engine's
    # config names no optimizer: the loop's is handed over), which bitsandbytes' 8-bit AdamW cannot be
    offload = ["distributed.strategy=deepspeed", "distributed.offload=true"]
    plan = decide(load_config(None, offload))
    assert plan.cpu_adam and plan.summary()["offload"] is True and not decide(load_config(None, zero3)).cpu_adam
    tcfg = load_config(None, offload).training
    assert "optimizer" not in loop_config(tcfg, plan)
    assert not decide(load_config(None, ["distributed.strategy=fsdp", "distributed.offload=true"])).cpu_adam
    with pytest.raises(AyarError, match="training.optimizer adamw_8bit with distributed.offload under DeepSpeed"):
        decide(load_config(None, [*offload, "training.optimizer=adamw_8bit"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    plan = decide(load_config(None, zero3))  # a GPU would hold the whole model before the engine splits it
    assert plan.device == "cuda" and plan.splits_while_loading and plan.load_placement.device == "cuda"
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as where it is not installed: import fails
    with pytest.raises(AyarError, match=r"needs DeepSpeed, which is not installed: pip install -e '.\[deepspeed\]'"):
        decide(load_config(None, ["distributed.strategy=deepspeed", "model.device=cpu", "stage=dpo"]))


def _zero3_run(model_dir, tmp_path):
    """ayar's own loop under ZeRO-3 in 2 processes (batch 4 each, checkpoints every 5 steps, built split as it loads)
    and the same run in one process (batch 8), on 43 rows: each epoch's last global micro-batch leaves one process
    without rows, it runs stand-in passes. Returns (one, zero3) run folders."""
    data = write_jsonl(tmp_path / "d.jsonl", (MATH_ROWS * 4)[:43])
    common = [f"model.name={model_dir}", f"data.train={data}", *COMMON, "training.save_steps=5"]
    one, zero3 = tmp_path / "one", tmp_path / "zero3"
    done = _train([*common, f"output.path={one}", "training.batch_size=8"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    zero = ["training.batch_size=4", *ZERO3, "distributed.loading=rank0"]  # built split as it loads (GPUs' auto)
    done = _train([*common, f"output.path={zero3}", *zero, "--nproc", "2"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world  2 processes (gloo, DeepSpeed ZeRO-3" in done.stderr
    return one, zero3


def test_the_own_loop_under_zero_3_trains_what_one_process_does(tiny_model_dir, tmp_path):
    """ayar's own loop on a DeepSpeed engine, ZeRO-3 (weights split too), batch 4 x 2 processes against 8 x 1: the same
    losses and adapter after 10 steps; its checkpoints are DeepSpeed's own, a part per process."""
    one, zero3 = _zero3_run(tiny_model_dir, tmp_path)
    assert_same_training(one, zero3, split=True)
    meta = json.loads((zero3 / "run.json").read_text())
    assert meta["plan"]["strategy"] == "deepspeed" and meta["plan"]["zero_stage"] == 3
    assert meta["plan"]["loading"] == "rank0"  # test_under_zero_3_the_model_is_split_as_it_loads: what it holds
    parts = sorted(p.name for p in (zero3 / "checkpoints" / "checkpoint-0000005" / "zero" / "state").iterdir())
    assert parts == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]


@pytest.mark.distributed
def test_a_killed_zero_3_run_resumes_to_the_uninterrupted_one(tiny_model_dir, tmp_path):
    """The ZeRO-3 run above, killed after its step-5 checkpoint and resumed, ends as the uninterrupted run; resuming
    it in one process (no DeepSpeed) is refused, saying how (in another number of processes:
    test_sharding.py's test_a_sharded_checkpoint_resumes_in_another_number_of_processes)."""
    one, zero3 = _zero3_run(tiny_model_dir, tmp_path)
    uninterrupted = losses(zero3)
    as_if_killed(zero3, 10)
    refused = _train(["--resume", str(zero3)], tmp_path)  # one process: no DeepSpeed
    assert refused.returncode != 0 and "by DeepSpeed ZeRO in 2 processes: resume it with" in refused.stderr
    said = " ".join(refused.stderr.split())
    assert "distributed.strategy deepspeed (the same zero_stage) in several processes (--nproc 2)" in said
    assert "Traceback" not in refused.stderr
    done = _train(["--resume", str(zero3), "--nproc", "2"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(zero3)[5:] == pytest.approx(uninterrupted[5:], rel=1e-6)
    assert_same_training(one, zero3, split=True)


@pytest.mark.distributed
def test_qlora_under_zero_3_trains_what_one_process_does_and_resumes(tiny_model_dir, tmp_path):
    """ayar's own loop over a 4-bit base under ZeRO-3 (the packed 4-bit bytes stored as floats and split, each process
    quantizing the base as it loads it), batch 4 x 2 processes against 8 x 1: the same losses and adapter after 10
    steps (with gradient checkpointing; and without, with offload); killed after its step-5 checkpoint and resumed,
    it ends as the uninterrupted run."""
    pytest.importorskip("bitsandbytes")
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 4)
    common = [f"model.name={tiny_model_dir}", f"data.train={data}", *COMMON, "method=qlora", "training.fused=false"]
    one, zero3 = tmp_path / "one", tmp_path / "zero3"
    done = _train([*common, f"output.path={one}", "training.batch_size=8"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    zero = ["training.batch_size=4", "training.save_steps=5", *ZERO3, "--nproc", "2"]
    done = _train([*common, f"output.path={zero3}", *zero, "training.gradient_checkpointing=true"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_training(one, zero3, split=True)
    # offload asked on a CPU: DeepSpeed's CPU Adam steps the adapter
    done = _train([*common, f"output.path={tmp_path / 'offload'}", *zero, "distributed.offload=true"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_training(one, tmp_path / "offload", split=True)
    plan = json.loads((zero3 / "run.json").read_text())["plan"]
    assert (plan["quantized"], plan["zero_stage"], plan["loading"]) == (True, 3, "every_rank")
    uninterrupted, ref = losses(zero3), load_file(zero3 / "adapter" / "adapter_model.safetensors")
    as_if_killed(zero3, 10)
    done = _train(["--resume", str(zero3), "--nproc", "2"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(zero3) == pytest.approx(uninterrupted, rel=1e-6)
    got = load_file(zero3 / "adapter" / "adapter_model.safetensors")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5)


def _dpo_runs(model_dir, tmp_path, runs: dict) -> dict:
    """DPO in 2 processes, 3 steps, one run per entry of `runs` (name: extra overrides), the first the reference;
    each other run's adapter is checked against the reference's. Returns the runs' folders by name."""
    from tests.unit.training.test_stages import PAIRS

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS[:8])
    common = [f"model.name={model_dir}", "model.dtype=float32", f"data.train={data}", "stage=dpo",
              "training.batch_size=2", "data.val_ratio=0.25", "training.max_steps=3", "training.warmup_ratio=0",
              "training.learning_rate=0.01", "training.tracker=none", "--nproc", "2"]  # fmt: skip
    for name, extra in runs.items():
        done = _train([*common, f"output.path={tmp_path / name}", *extra], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    first, *others = runs
    ref = load_file(tmp_path / first / "adapter" / "adapter_model.safetensors")
    assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 0  # it trained
    for name in others:
        got = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
        assert got.keys() == ref.keys()
        # AdamW moves a weight whose gradient is ~0 by up to the learning rate (0.01) whatever the gradient's
        # float rounding: an odd element differs by ~1e-4 (one in 512 seen); on average they agree to < 1e-6
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-3, rtol=0)
        assert sum(float((got[k] - ref[k]).abs().sum()) for k in ref) / sum(v.numel() for v in ref.values()) < 1e-6
    return {name: tmp_path / name for name in runs}


@pytest.mark.distributed
def test_dpo_under_zero_2_and_3_trains_the_data_parallel_adapter(tiny_model_dir, tmp_path):
    """DPO, 2 processes, 3 steps: ZeRO-2 and ZeRO-3 (weights split too, gathered whole to save) give the adapter
    the DDP run gives; the checkpoints are DeepSpeed's, one part per rank."""
    runs = {
        "ddp": [],
        "zero2": ["distributed.strategy=deepspeed", "training.save_steps=3"],
        "zero3": [*ZERO3, "distributed.loading=rank0"],  # built split as it loads
    }
    for name, run in _dpo_runs(tiny_model_dir, tmp_path, runs).items():
        plan = json.loads((run / "run.json").read_text())["plan"]
        assert plan["strategy"] == ("ddp" if name == "ddp" else "deepspeed")
        assert plan.get("loading") == ("rank0" if name == "zero3" else None)
    parts = sorted(p.name for p in (tmp_path / "zero2" / "checkpoints").glob("checkpoint-3/global_step3/*optim*"))
    assert parts == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


@pytest.mark.distributed
def test_dpo_with_qlora_under_zero_2_and_3_trains_the_data_parallel_adapter(tmp_path):
    """QLoRA on a Trainer stage in 2 processes: DeepSpeed ZeRO-2 (the adapter's optimizer states split) and ZeRO-3
    (the packed 4-bit bytes split too, stored as floats) give the adapter DDP gives over the same 4-bit base; all
    saved in fp32 (adapters.py `trainable_in_fp32`)."""
    from tests.helpers import save_tiny

    model_dir = save_tiny(tmp_path / "m", "qwen2", hidden_size=64, intermediate_size=128)  # bnb packs 64-wide blocks
    runs = {
        "ddp": ["method=qlora"],
        "zero2": ["method=qlora", "distributed.strategy=deepspeed"],
        "zero3": ["method=qlora", *ZERO3],
    }
    runs = _dpo_runs(model_dir, tmp_path, runs)
    for run in runs.values():
        assert json.loads((run / "run.json").read_text())["plan"]["quantized"]
        assert {v.dtype for v in load_file(run / "adapter" / "adapter_model.safetensors").values()} == {torch.float32}


@pytest.mark.distributed
def test_the_own_loop_under_zero_trains_what_one_process_does(tiny_model_dir, tmp_path):
    """ZeRO-2 with accumulation (2 rows x 2 micro-batches x 2 processes) and a full fine-tune under ZeRO-3 (saved
    gathered), against one process with the same global batch: the same losses and weights after 10 steps."""
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 4)
    common = [f"model.name={tiny_model_dir}", f"data.train={data}", *COMMON]
    zero = ["distributed.strategy=deepspeed", "--nproc", "2"]
    runs = {
        "one": ["training.batch_size=8"],
        "zero2": ["training.batch_size=2", "training.grad_accum=2", *zero],
        "one-full": ["training.batch_size=8", "method=full", "training.learning_rate=1e-3"],
        "zero3-full": ["training.batch_size=4", "method=full", "training.learning_rate=1e-3", *zero,
                       "distributed.zero_stage=3"],
    }  # fmt: skip
    for name, extra in runs.items():
        done = _train([*common, f"output.path={tmp_path / name}", *extra], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_training(tmp_path / "one", tmp_path / "zero2", split=True)
    a, b = losses(tmp_path / "one-full"), losses(tmp_path / "zero3-full")
    assert len(a) == len(b) == 10 and max(abs(x - y) / x for x, y in zip(a, b)) < 1e-5, (a, b)
    wa = load_file(tmp_path / "one-full" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "zero3-full" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)


def _early_stopping_run(rank: int, world: int, model_dir: str, data: str, port: int, out: str, *extra: str) -> None:
    """One of `world` processes of a LoRA run that stops early (its eval loss made to rise after the first
    evaluation), as a launcher would start it; each records the trained weights at every evaluation."""
    import os

    from ayar.training import loop
    from ayar.training.sft import train_sft
    from tests.helpers import run_config

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), AYAR_HOME=f"{out}/home{rank}")
    real, seen = loop.evaluate, []

    def rising(model, *args):
        seen.append(args[-1].trained_copy())  # args[-1]: the Parallel (collective: every process evaluates)
        return real(model, *args) + 10 * (len(seen) - 1)

    loop.evaluate = rising
    cfg = run_config(
        model_dir, data, out, *extra, f"output.path={out}/run{world}", "data.val_ratio=0.25", "data.lint=warn",
        "training.max_steps=10", "training.eval_steps=1", "training.early_stopping_patience=2", "lora.dropout=0",
        "training.learning_rate=1e-2", "training.warmup_ratio=0", "training.threads=1",
    )  # fmt: skip
    train_sft(cfg)
    torch.save(seen, f"{out}/seen{world}-{rank}.pt")


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["lora", "full"])
def test_under_zero_3_early_stopping_keeps_the_best_adapter(method, tmp_path):
    """Early stopping under ZeRO-3 (each process loading the whole model): the adapter (or fully fine-tuned model)
    saved is the best evaluation's (step 1's: gathered a weight at a time onto rank 0 to keep it, put back into the
    split weights at the end, after training had moved on), as one process keeps it."""
    from ayar.netutil import free_port
    from tests.helpers import save_tiny

    model_dir = save_tiny(tmp_path / "tiny", "qwen2")
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 4)
    # each process loads the whole model here (auto, on a CPU; the engine splits it), as the full fine-tune does
    zero3 = ("training.batch_size=4", *ZERO3)
    full = ("method=full", "training.learning_rate=1e-3") if method == "full" else ()
    for world, extra in ((1, ("training.batch_size=8",)), (2, zero3)):
        args = (world, str(model_dir), str(data), free_port(), str(tmp_path), *extra, *full)
        torch.multiprocessing.spawn(_early_stopping_run, args=args, nprocs=world)
    saved = {}
    for world in (1, 2):
        run = tmp_path / f"run{world}"
        meta = json.loads((run / "run.json").read_text())
        assert meta["stopped_early"] and meta["steps"] == 3 and meta["best_step"] == 1, meta
        seen = torch.load(tmp_path / f"seen{world}-0.pt")
        if world == 2:  # the copy is rank 0's alone: rank 1 held none
            assert torch.load(tmp_path / "seen2-1.pt") == [{}] * len(seen)
        saved[world] = load_file(run / ("model/model.safetensors" if full else "adapter/adapter_model.safetensors"))
        assert saved[world].keys() == seen[0].keys()
        assert all(torch.equal(saved[world][k], seen[0][k]) for k in seen[0])
        assert any(not torch.equal(seen[0][k], seen[-1][k]) for k in seen[0])  # training had moved on
    if not full:  # the split rule: an odd element of an adapter apart by 1.7e-4 was seen on an AVX512-BF16 CPU
        assert_same_adapters(tmp_path / "run1", tmp_path / "run2", split=True)
        return
    for k in saved[1]:
        torch.testing.assert_close(saved[1][k], saved[2][k], atol=1e-4, rtol=1e-3)


def _load_split(rank: int, model_dir: str, port: int, out: str) -> None:
    """One of 2 processes loading a model and adding a DoRA adapter as a ZeRO-3 run does (rank-0 loading): what
    each process holds of each base weight, and the weights and DoRA magnitudes gathered whole, saved by rank."""
    import os

    from ayar.models.adapters import apply_method
    from ayar.models.load import load_model_and_tokenizer
    from ayar.training import distributed, zero
    from ayar.training.plan import decide
    from tests.helpers import run_config

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), AYAR_HOME=f"{out}/home{rank}")
    cfg = run_config(model_dir, f"{out}/d.jsonl", out, "method=dora", *ZERO3, "distributed.loading=rank0")
    plan = decide(cfg)
    distributed.start(plan)
    with zero.split_while_loading(plan, cfg.training):
        model = load_model_and_tokenizer(cfg.model, plan.load_placement)[0]
        held = {n: (p.numel(), p.ds_tensor.numel(), p.ds_numel) for n, p in model.named_parameters()}
        model = apply_method(model, "dora", cfg.lora)
    import deepspeed

    whole = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            whole[name] = p.detach().clone()
    torch.save({"plan": plan.summary(), "held": held, "whole": whole}, f"{out}/split{rank}.pt")
    distributed.stop(distributed.World(2, rank))


def test_under_zero_3_the_model_is_split_as_it_loads(tiny_model_dir, tmp_path):
    """ZeRO-3's rank-0 loading (auto's on GPUs): each of 2 processes holds half of every weight from the start (the
    model built split, rank 0 reading the files), gathered they are the file's weights, and the DoRA adapter peft
    adds over them is the one it adds over the whole model in one process (its magnitudes read the split weights
    whole)."""
    from ayar.models.adapters import apply_method
    from ayar.netutil import free_port
    from tests.helpers import run_config

    torch.multiprocessing.spawn(_load_split, args=(str(tiny_model_dir), free_port(), str(tmp_path)), nprocs=2)
    one = run_config(tiny_model_dir, tmp_path / "d.jsonl", tmp_path, "method=dora")
    from ayar.models.load import load_model_and_tokenizer

    torch.manual_seed(0)
    ref = apply_method(load_model_and_tokenizer(one.model)[0], "dora", one.lora)
    ref_state = {n: p.detach() for n, p in ref.named_parameters()}
    file = load_file(tiny_model_dir / "model.safetensors")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"split{rank}.pt")
        assert got["plan"]["loading"] == "rank0" and got["plan"]["zero_stage"] == 3
        assert got["held"].keys() == file.keys()
        for name, (local, part, whole) in got["held"].items():
            assert local == 0 and whole == file[name].numel() and part == -(-whole // 2), name
        assert got["whole"].keys() == ref_state.keys()
        for name, value in got["whole"].items():
            if "lora_A" in name or "lora_B" in name:
                continue  # drawn at random: their own seed in each process
            torch.testing.assert_close(value, ref_state[name], rtol=1e-6, atol=0, msg=name)
        assert any("lora_magnitude" in n for n in got["whole"])


@pytest.mark.distributed
def test_offload_asked_on_a_cpu_trains_what_one_process_does_and_resumes(tiny_model_dir, tmp_path):
    """`distributed.offload`, written for GPUs, runs unchanged on a CPU (nothing to move there) through the same code
    as on GPUs, 2 processes against 1 with the same global batch, 10 steps. ayar's own loop: ZeRO-2 with LoRA+ (its
    two learning rates in DeepSpeed's CPU Adam, the one optimizer DeepSpeed steps offloaded states with: a torch AdamW
    is refused there), killed after its step-5 checkpoint and resumed to the uninterrupted run; ZeRO-3 (weights
    offloaded too); FSDP (CPU offload policy). DPO (3 steps) under ZeRO-2 (the optimizer named in DeepSpeed's config)
    and FSDP (accelerate's plugin) with offload trains the data-parallel adapter."""
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 4)
    common = [f"model.name={tiny_model_dir}", f"data.train={data}", *COMMON, "training.save_steps=5"]
    offload = ["training.batch_size=4", "distributed.offload=true", "--nproc", "2"]
    # LoRA+ at half the rate, its B matrices at the plain runs' 0.01: at 0.04 DeepSpeed's C++ Adam and torch's AdamW
    # (the one-process run's) drift apart by rounding to 2e-5 in 10 steps, doubling each step from 5e-7 at step 3
    loraplus = ["training.learning_rate=0.005", "training.loraplus_lr_ratio=2"]
    runs = {
        "one": ["training.batch_size=8", *loraplus],
        "zero2": ["distributed.strategy=deepspeed", *loraplus, *offload],
        "one-plain": ["training.batch_size=8"],
        "zero3": [*ZERO3, *offload],
        "fsdp": ["distributed.strategy=fsdp", *offload],
    }
    for name, extra in runs.items():
        done = _train([*common, f"output.path={tmp_path / name}", *extra], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        said = " ".join(done.stderr.split())  # the world line, as wide as the terminal
        if name == "zero3":
            assert "weights split across the processes, offloaded to CPU RAM (DeepSpeed's CPU Adam)" in said
        if name == "fsdp":
            assert "a unit per decoder layer, each reads its parts of the weights, offloaded to CPU RAM" in said
    for name, ref in (("zero2", "one"), ("zero3", "one-plain"), ("fsdp", "one-plain")):
        assert_same_training(tmp_path / ref, tmp_path / name, split=True)
        assert json.loads((tmp_path / name / "run.json").read_text())["plan"]["offload"] is True
    state = torch.load(
        tmp_path / "zero2" / "checkpoints" / "checkpoint-0000005" / "zero" / "state"
        / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False,
    )  # fmt: skip
    groups = state["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [0.005, 0.01]  # LoRA+'s A and B groups (its empty one dropped)
    assert all("bias_correction" in g and "fused" not in g for g in groups)  # DeepSpeed's CPU Adam's, not torch's

    uninterrupted = losses(tmp_path / "zero2")
    as_if_killed(tmp_path / "zero2", 10)
    done = _train(["--resume", str(tmp_path / "zero2"), "--nproc", "2"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(tmp_path / "zero2")[5:] == pytest.approx(uninterrupted[5:], rel=1e-6)
    assert_same_training(tmp_path / "one", tmp_path / "zero2", split=True)

    dpo = {
        "dpo-ddp": [],
        "dpo-zero2": ["distributed.strategy=deepspeed", "distributed.offload=true", "training.save_steps=3"],
        "dpo-fsdp": ["distributed.strategy=fsdp", "distributed.offload=true"],
    }
    for name, run in _dpo_runs(tiny_model_dir, tmp_path, dpo).items():
        assert json.loads((run / "run.json").read_text())["plan"].get("offload", False) is (name != "dpo-ddp")
    state = torch.load(
        next((tmp_path / "dpo-zero2" / "checkpoints").glob("checkpoint-3/global_step3/zero_pp_rank_0_*optim*")),
        weights_only=False,
    )  # the optimizer DeepSpeed stepped: its CPU Adam, named in the config (transformers' own AdamW is refused)
    assert all("bias_correction" in g for g in state["optimizer_state_dict"]["base_optimizer_state"]["param_groups"])


def test_a_checkpoint_deepspeed_cannot_convert_says_how_to_resume(tmp_path):
    """Resuming in another number of processes converts DeepSpeed's checkpoint (ds_to_universal); where DeepSpeed
    cannot (here: parts missing), the error names the run and the way back, and no half-made copy is left."""
    from ayar.errors import AyarError
    from ayar.training.zero import _to_universal

    state = tmp_path / "run" / "checkpoints" / "checkpoint-0000002" / "zero" / "state"
    state.mkdir(parents=True)
    with pytest.raises(AyarError, match=r"checkpoint-0000002 was written by another number of processes.*--nproc"):
        _to_universal(state, state.parent / "universal")
    assert not (state.parent / "universal").exists()
