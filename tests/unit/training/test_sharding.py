"""FSDP (`distributed.strategy: fsdp`, training/sharding.py) on gloo, 2 processes on this machine: the same losses
and the same adapter / model as one process with the same global batch, a sharded checkpoint resumed to the
uninterrupted run, and the refusals; the Trainer stages on accelerate's FSDP plugin, against data parallel."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from ayar.netutil import free_port
from tests.helpers import MATH_ROWS, save_tiny, write_jsonl
from tests.unit.training.test_distributed import (
    COMMON,
    _train,
    as_if_killed,
    assert_same_adapters,
    assert_same_training,
    losses,
    stage_inputs,
)


def test_fsdp_lora_trains_what_one_process_does(tiny_model_dir, tmp_path):
    """LoRA, batch 4 x 2 processes (gradient checkpointing; each reads its parts of the weights from the files) and
    2 x 2 processes x 2 accumulation steps (hybrid shard; rank 0 reads the weights), against 8 x 1: the same per-step
    losses (1e-5 relative) and adapter after 10 steps; the checkpoints are sharded (a part per rank)."""
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 4)
    # the reference without the fused decoder too (FSDP does not take it): the same kernels on both sides
    common = [f"model.name={tiny_model_dir}", f"data.train={data}", *COMMON]
    fsdp = ["distributed.strategy=fsdp", "--nproc", "2"]
    runs = {
        "one": ["training.batch_size=8", "training.fused=false"],
        # with gradient checkpointing: each layer's forward recomputed in backward gathers its weights again
        "fsdp": ["training.batch_size=4", "training.save_steps=5", "training.gradient_checkpointing=true", *fsdp],
        # hybrid: split within the node (here both processes), replicated across nodes (one here): a 2-D mesh
        "accum": [
            "training.batch_size=2",
            "training.grad_accum=2",
            "distributed.shard=hybrid",
            "distributed.loading=rank0",
            *fsdp,
        ],
    }
    for name, extra in runs.items():
        done = _train([*common, f"output.path={tmp_path / name}", *extra], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_training(tmp_path / "one", tmp_path / "fsdp")
    assert_same_training(tmp_path / "one", tmp_path / "accum")
    assert "world  2 processes (gloo, FSDP hybrid shard, a unit per decoder layer, rank 0 reads" in done.stderr
    meta = json.loads((tmp_path / "fsdp" / "run.json").read_text())
    assert meta["plan"]["strategy"] == "fsdp" and meta["plan"]["world_size"] == 2
    assert meta["plan"]["loading"] == "parts"
    assert "FSDP splits the weights" in meta["passes"]["not_fused_because"]
    shards = tmp_path / "fsdp" / "checkpoints" / "checkpoint-0000005" / "sharded"
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (shards.parent / "adapter.safetensors").exists()
    # the saved adapter loads as any PEFT adapter: the same keys as the one-process run's
    cfg = json.loads((tmp_path / "fsdp" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"


@pytest.mark.distributed
def test_modules_trained_in_full_beside_the_adapters_are_split_as_they_are(tiny_model_dir, tmp_path):
    """`lora.modules_to_save` inside the decoder layers over a bf16 base: peft's copies, trained in full, are fp32
    as the adapters are (models/adapters.py `trainable_in_fp32`), so FSDP and ZeRO-3, whose units take one dtype of
    trained weights, split them (both stopped with "FSDP expects uniform original parameter dtype" / an assertion
    in DeepSpeed's `defragment` before), and train as data parallel trains with the same batches: in bf16 the
    gradients' other summing order moves a bf16 rounding now and then, and the runs drift apart by up to 0.14 %
    (FSDP) and 0.5 % (ZeRO-3) over 10 steps at this high learning rate (0.01), so the losses are held to 1 %."""
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 4)
    common = [
        f"model.name={tiny_model_dir}",
        f"data.train={data}",
        *COMMON,
        "model.dtype=bfloat16",
        "lora.modules_to_save=[input_layernorm]",
        "training.fused=false",
        "training.batch_size=4",
        "--nproc",
        "2",
    ]
    runs = {"ddp": [], "fsdp": ["distributed.strategy=fsdp"],
            "zero3": ["distributed.strategy=deepspeed", "distributed.zero_stage=3"]}  # fmt: skip
    for name, extra in runs.items():
        done = _train([*common, f"output.path={tmp_path / name}", *extra], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    copies = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    assert {v.dtype for k, v in copies.items() if "input_layernorm" in k} == {torch.float32}
    ref = losses(tmp_path / "ddp")
    assert len(ref) == 10 and ref[-1] < ref[0] / 2
    for name in ("fsdp", "zero3"):
        assert losses(tmp_path / name) == pytest.approx(ref, rel=1e-2), name


@pytest.mark.distributed
def test_fsdp_dora_trains_what_one_process_does(tiny_model_dir, tmp_path):
    """DoRA, batch 4 x 2 processes, each reading its parts of the weights and computing its part of the magnitude
    vectors, against 8 x 1: the same per-step losses and adapter (magnitudes included) after 10 steps."""
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 4)
    common = [f"model.name={tiny_model_dir}", f"data.train={data}", *COMMON, "method=dora", "training.fused=false"]
    runs = {
        "one": ["training.batch_size=8"],
        "fsdp": ["training.batch_size=4", "distributed.strategy=fsdp", "--nproc", "2"],
    }
    for name, extra in runs.items():
        done = _train([*common, f"output.path={tmp_path / name}", *extra], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_training(tmp_path / "one", tmp_path / "fsdp")
    assert json.loads((tmp_path / "fsdp" / "run.json").read_text())["plan"]["loading"] == "parts"
    adapter = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    assert any("magnitude" in k for k in adapter)


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_fsdp_qlora_trains_what_one_process_does(tiny_model_dir, tmp_path, method):
    """QLoRA / QDoRA under FSDP (bitsandbytes' FSDP-QLoRA: the packed 4-bit bytes stored as floats, so FSDP splits
    them like any weight): batch 4 x 2 processes against 8 x 1, the same per-step losses and adapter after 10
    steps, with an evaluation between steps (the 4-bit weights are read as they were after it), with gradient
    checkpointing, with `offload` asked too (QLoRA), and a sharded checkpoint resumed to the uninterrupted run.
    The base is loaded and quantized by rank 0 alone, which sends the other process its parts and the quant states
    (QDoRA: rank 1's magnitudes made on its empty model, then rank 0's), or by each process (`every_rank`: QLoRA's
    run with offload, QDoRA's without checkpointing)."""
    pytest.importorskip("bitsandbytes")
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 4)
    common = [
        f"model.name={tiny_model_dir}",
        f"data.train={data}",
        *COMMON,
        f"method={method}",
        "training.fused=false",
        "data.val_ratio=0.2",
        "training.eval_steps=3",
    ]
    fsdp = ["training.batch_size=4", "training.save_steps=5", "distributed.strategy=fsdp", "--nproc", "2"]
    # with gradient checkpointing (each layer's recompute gathers its 4-bit weights again), as QLoRA usually runs
    runs = {"one": ["training.batch_size=8"], "fsdp": [*fsdp, "training.gradient_checkpointing=true"]}
    if method == "qlora":  # offload asked on a CPU: torch's CPU offload policy over the split 4-bit weights
        runs["offload"] = [*fsdp, "distributed.offload=true", "distributed.loading=every_rank"]
    else:
        runs["every"] = [*fsdp, "distributed.loading=every_rank"]
    for name, extra in runs.items():
        done = _train([*common, f"output.path={tmp_path / name}", *extra], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    for name in runs.keys() - {"one"}:
        assert_same_training(tmp_path / "one", tmp_path / name, split=True)
    evals = [
        [
            r["eval_loss"]
            for r in map(json.loads, (tmp_path / n / "metrics.jsonl").read_text().splitlines())
            if "eval_loss" in r
        ]
        for n in ("one", "fsdp")
    ]
    assert len(evals[0]) >= 3 and evals[0] == pytest.approx(evals[1], rel=1e-5)
    meta = json.loads((tmp_path / "fsdp" / "run.json").read_text())
    assert meta["plan"]["loading"] == "rank0" and meta["plan"]["quantized"]
    shards = tmp_path / "fsdp" / "checkpoints" / "checkpoint-0000005" / "sharded"
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    run = tmp_path / "fsdp"
    ref_losses, ref = losses(run), load_file(run / "adapter" / "adapter_model.safetensors")
    as_if_killed(run, 10)  # after step 5
    done = _train(["--resume", str(run), "--nproc", "2"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resume checkpoint-0000005" in done.stderr and losses(run) == ref_losses
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_qlora_over_a_bf16_base_splits_as_data_parallel_trains(tiny_model_dir, tmp_path, strategy):
    """QLoRA over a bf16 base keeps the base's norms, embeddings and head in bf16 (models/adapters.py `for_trainer`),
    so what FSDP and ZeRO-3 split mixes dtypes: the packed 4-bit bytes stored as bf16, the rest bf16, the adapters
    fp32 (an empty rank's 4-bit layers' biases made fp32 by bitsandbytes failed FSDP's all-gather: models/load.py
    `_as_quantized`). 2 processes split against 2 under DDP: under FSDP the same losses and adapters (1e-6); under
    ZeRO-3, whose config turns on DeepSpeed's own bf16 mode, its mixed precision's: losses within 1 %, adapters 10 %."""
    pytest.importorskip("bitsandbytes")
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 4)
    common = [f"model.name={tiny_model_dir}", f"data.train={data}", *COMMON, "model.dtype=bfloat16", "method=qlora",
              "training.fused=false", "training.batch_size=4", "--nproc", "2"]  # fmt: skip
    split = {"fsdp": ["distributed.strategy=fsdp"],
             "zero3": ["distributed.strategy=deepspeed", "distributed.zero_stage=3"]}[strategy]  # fmt: skip
    for name, extra in {"ddp": ["distributed.strategy=ddp"], strategy: split}.items():
        done = _train([*common, f"output.path={tmp_path / name}", *extra], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((tmp_path / strategy / "run.json").read_text())
    assert meta["plan"]["quantized"] and meta["dtype"] == "bfloat16"
    la, lb = losses(tmp_path / "ddp"), losses(tmp_path / strategy)
    assert len(la) == len(lb) == 10 and la[-1] < la[0]
    tol = 1e-6 if strategy == "fsdp" else 1e-2
    assert la == pytest.approx(lb, rel=tol)
    a, b = (load_file(tmp_path / n / "adapter" / "adapter_model.safetensors") for n in ("ddp", strategy))
    assert a.keys() == b.keys()
    # AdamW moves a weight of ~0 gradient by up to its learning rate whatever the gradient's rounding: compared whole
    assert max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a) < (1e-6 if strategy == "fsdp" else 0.1)


@pytest.mark.distributed
def test_fsdp_full_fine_tune_trains_what_one_process_does(tiny_model_dir, tmp_path):
    """method full: every weight split across the ranks (the embeddings and head in the root unit, each decoder
    layer its own); the model saved whole equals the one-process run's."""
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 4)
    common = [
        f"model.name={tiny_model_dir}",
        f"data.train={data}",
        *COMMON,
        "method=full",
        "training.learning_rate=1e-3",
    ]
    for name, extra in {"one": ["training.batch_size=8"], "fsdp": ["training.batch_size=4"]}.items():
        args = [*common, f"output.path={tmp_path / name}", *extra]
        if name == "fsdp":
            args += ["distributed.strategy=fsdp", "--nproc", "2"]
        done = _train(args, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    la, lb = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert len(la) == 10 and la[-1] < la[0]
    assert max(abs(x - y) / abs(x) for x, y in zip(la, lb)) < 1e-5, (la, lb)
    wa = load_file(tmp_path / "one" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "fsdp" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)


@pytest.mark.distributed
def test_a_sharded_checkpoint_resumes_to_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """The run's step-2 checkpoint (each rank's part of the adapter and AdamW states) resumed with the same two
    processes: steps 3-4 and the adapter exactly as the run that went on."""
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 2)
    run = tmp_path / "run"
    args = [f"model.name={tiny_model_dir}", f"data.train={data}", *COMMON, "training.max_steps=4",
            "training.save_steps=1", "training.save_total_limit=4", "training.batch_size=2",
            "distributed.strategy=fsdp", f"output.path={run}", "--nproc", "2"]  # fmt: skip
    done = _train(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ref_losses = losses(run)
    ref = load_file(run / "adapter" / "adapter_model.safetensors")
    as_if_killed(run, 3, 4)  # after step 2
    resumed = _train(["--resume", str(run), "--nproc", "2"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume checkpoint-0000002" in resumed.stderr
    assert losses(run) == ref_losses and len(ref_losses) == 4
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    # a split checkpoint cannot be read whole: one process says how to resume it
    whole = _train(["--resume", str(run)], tmp_path)
    assert whole.returncode != 0 and "Traceback" not in whole.stderr
    assert (
        "split across processes by FSDP in 2 processes: resume it with distributed.strategy fsdp in several processes"
        in whole.stderr
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["method=qlora", "distributed.loading=parts"],
            "distributed.loading parts with method qlora under FSDP, stage sft: rank 0 quantizes the base to 4 bits "
            "as it loads it and sends the others their parts; use distributed.loading: rank0",
        ),
        (
            ["method=qlora", "stage=dpo", "distributed.loading=rank0"],
            "distributed.loading rank0 with method qlora under FSDP, stage dpo: each process quantizes",
        ),
        (["lora.init=pissa"], "lora.init pissa under distributed.strategy fsdp"),
        (
            ["stage=dpo", "distributed.shard=hybrid"],
            "shard hybrid is for ayar's own loop .* stage dpo / task causal_lm runs on a transformers Trainer, which "
            "splits across every process: use distributed.shard: full",
        ),
    ],
)
def test_what_fsdp_cannot_run_is_refused_before_loading(overrides, message, monkeypatch):
    from ayar.config import load_config
    from ayar.errors import AyarError
    from ayar.training.plan import decide

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = load_config(None, ["distributed.strategy=fsdp", "model.device=cpu", *overrides])
    with pytest.raises(AyarError, match=message):
        decide(cfg)


def test_one_process_ignores_the_strategy(monkeypatch):
    from ayar.config import load_config
    from ayar.training.plan import decide

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert decide(load_config(None, ["distributed.strategy=fsdp", "model.device=cpu"])).strategy == "single"


@pytest.mark.parametrize(
    ("strategy", "rank", "reads", "device"),
    [("fsdp", 0, True, "cpu"), ("fsdp", 1, False, "cpu"), ("ddp", 1, True, "cuda")],
)
def test_under_fsdp_only_rank_0_reads_the_weights_into_cpu_ram(monkeypatch, strategy, rank, reads, device):
    """On GPUs too: rank 0 loads the whole model into CPU RAM, not onto its GPU (splitting moves each part to its
    device), and the other ranks load nothing; data parallelism loads the whole model onto every GPU."""
    from ayar.config import load_config
    from ayar.training.plan import decide

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    plan = decide(load_config(None, [f"distributed.strategy={strategy}", "distributed.loading=rank0"]))
    assert plan.device == "cuda" and plan.strategy == strategy
    assert plan.reads_weights is reads
    assert plan.load_placement.device == device and plan.load_placement.dtype == plan.placement.dtype


def test_the_run_plans_memory_per_process(tiny_model_dir, monkeypatch):
    """Under FSDP a process plans its share of the weights, gradients and AdamW states; on a CPU the processes
    share the machine's RAM, so each is given its part of it."""
    import dataclasses

    from ayar.config import load_config
    from ayar.models.load import load_model_and_tokenizer
    from ayar.training import memory
    from ayar.training.plan import decide
    from tests.helpers import examples

    monkeypatch.setattr(memory, "available_memory", lambda device: 8 * 2**30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=float32", "method=full", "model.device=cpu"])
    plan = decide(cfg)
    model, tok, _, _ = load_model_and_tokenizer(cfg.model, plan.placement, log=lambda *_: None)
    rows = examples(tok)
    lines = []
    one = plan.with_passes(cfg, model, rows, lines.append)
    fsdp = dataclasses.replace(plan, world_size=2, strategy="fsdp").with_passes(cfg, model, rows, lines.append)
    assert one.memory.available == 8 * 2**30 and fsdp.memory.available == 4 * 2**30
    assert fsdp.memory.parts["weights"] < one.memory.parts["weights"]
    assert "per process of 4.0 GB available per process" in lines[-1]
    # offload asked: on a CPU what it "moves" stays in the RAM checked; on a GPU it leaves the GPU's memory
    on_cpu = load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=float32", "method=full",
                                "model.device=cpu", "distributed.offload=true"])  # fmt: skip
    offload = dataclasses.replace(plan, world_size=2, strategy="fsdp", distributed=on_cpu.distributed)
    assert offload.with_passes(on_cpu, model, rows, lines.append).memory.total == fsdp.memory.total
    on_gpu = dataclasses.replace(offload, placement=dataclasses.replace(plan.placement, device="cuda"))
    monkeypatch.setattr(memory, "available_memory", lambda device: 8 * 2**30 if device == "cuda" else 2**40)
    gpu = on_gpu.with_passes(on_cpu, model, rows, lines.append).memory
    assert gpu.offloaded > 0 and gpu.total < fsdp.memory.total and "weights" not in gpu.parts


@pytest.mark.distributed
def test_a_sharded_checkpoint_resumes_in_another_number_of_processes(tiny_model_dir, tmp_path):
    """A 2-process FSDP checkpoint (global micro-batches of 2 x 2 rows) resumed by 4 processes (2 x 4 rows): the
    saved parts are re-split for 4 ranks (torch.distributed.checkpoint) and the position in the epoch carries over
    in examples. DeepSpeed's (ZeRO-2 and ZeRO-3) the same way, converted into its universal checkpoint first (beside
    the checkpoint, removed once read). Steps 3-4 equal those of a DDP run resumed the same way (DDP's resume in
    another number of processes is exact: test_distributed.py), all without the fused decoder."""
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 2)
    steps = {}
    strategies = {
        "fsdp": ["distributed.strategy=fsdp"],
        "zero2": ["distributed.strategy=deepspeed"],
        "zero3": ["distributed.strategy=deepspeed", "distributed.zero_stage=3"],
        "ddp": ["distributed.strategy=ddp"],
    }
    for name, strategy in strategies.items():
        run = tmp_path / name
        args = [f"model.name={tiny_model_dir}", f"data.train={data}", *COMMON, "training.max_steps=4",
                "training.save_steps=2", "training.batch_size=2", "training.fused=false",
                *strategy, f"output.path={run}", "--nproc", "2"]  # fmt: skip
        done = _train(args, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        as_if_killed(run, 4)
        kept = run / "checkpoints" / "checkpoint-0000002"
        before = sorted(p.relative_to(kept) for p in kept.rglob("*"))
        resumed = _train(["--resume", str(run), "--nproc", "4"], tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resume checkpoint-0000002" in resumed.stderr and "world  4 processes" in resumed.stderr
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        # steps 1-2 took 2 x 4 rows of the epoch's order, step 3 the next 8 (4 processes x 2): 16 rows in
        assert abs(records[2]["epoch"] - 16 / len(MATH_ROWS * 2)) < 1e-4, records
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        assert sorted(p.relative_to(kept) for p in kept.rglob("*")) == before  # no conversion left behind
        steps[name] = [r["loss"] for r in records]
    for name in ("fsdp", "zero2", "zero3"):
        assert max(abs(x - y) / abs(x) for x, y in zip(steps[name], steps["ddp"])) < 1e-5, (name, steps)


@pytest.mark.parametrize(
    "strategy, split",
    [(["distributed.strategy=fsdp"], "distributed.strategy fsdp"),
     (["distributed.strategy=deepspeed", "distributed.zero_stage=3", "stage=dpo"], "deepspeed ZeRO-3")]
)  # fmt: skip
def test_a_run_that_continues_an_earlier_adapter_is_refused_where_weights_are_split(tmp_path, monkeypatch, strategy,
                                                                                    split):  # fmt: skip
    """The earlier adapters are stacked into the saved one from the model's own weights, which FSDP and ZeRO-3 hold
    split: refused before loading (ZeRO-2 and DDP keep whole weights and stack as one process does)."""
    from ayar.config import load_config
    from ayar.errors import AyarError
    from ayar.training.plan import decide

    earlier = tmp_path / "sft-run"
    (earlier / "adapter").mkdir(parents=True)
    (earlier / "adapter" / "adapter_config.json").write_text("{}")
    (earlier / "run.json").write_text(json.dumps({"base_model": "base"}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = load_config(None, [f"model.name={earlier}", "model.device=cpu", *strategy])
    with pytest.raises(AyarError, match=f"under {split} the weights are split and the adapters are not stacked"):
        decide(cfg)
    zero2 = load_config(None, [f"model.name={earlier}", "model.device=cpu", "distributed.strategy=deepspeed",
                               "stage=dpo"])  # fmt: skip
    assert decide(zero2).strategy == "deepspeed"


def _split(
    rank: int, model_dir: str, port: int, out: str, parts: bool = False, split: str = "full", method: str = "lora"
) -> None:
    """One of two gloo processes: rank 0 loads the model, rank 1 builds it empty (`parts`: both build it empty and
    an adapter (`method`) is made on it, then each reads its parts of the weights from the files; `method` qlora
    without `parts`: rank 0 loads it in 4-bit, rank 1 builds it empty in 4-bit and learns the quant states); both
    split it and compute the loss of one batch through the split model."""
    import torch.distributed as dist

    from ayar.config.schema import DistributedConfig, LoraConfig
    from ayar.models.adapters import apply_method, quantization_config
    from ayar.models.device import choose_placement
    from ayar.models.load import empty_model, load_model
    from ayar.training import sharding

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    placement = choose_placement("cpu", "float32")
    quantized = method == "qlora" and not parts
    kw = {"quantization_config": quantization_config(method, torch.float32, torch.float32)} if quantized else {}
    model = (
        load_model(model_dir, placement, **kw) if rank == 0 and not parts else empty_model(model_dir, placement, **kw)
    )
    if quantized:
        sharding.four_bit_from_rank0(model, rank)
        _dequantizing(model)
    base = model
    if parts:
        torch.manual_seed(7)
        model = apply_method(model, method, LoraConfig(r=4, dropout=0.0))
    dcfg = DistributedConfig(strategy="fsdp", shard=split)
    root = sharding.shard(model, dcfg, "cpu", 2, rank, model_dir if parts else None)
    with torch.no_grad():
        loss, n = root(_batch())
    rotary = [b for name, b in base.named_buffers() if name.endswith("inv_freq")]
    tied = base.lm_head.weight is base.model.embed_tokens.weight
    adapter = sharding.trained_state(root) if parts else {}
    got = {"loss": float(loss) / n, "tied": tied, "rotary": rotary, "adapter": adapter}
    torch.save(got, f"{out}/{split}{method}{rank}.pt")
    dist.destroy_process_group()


def _dequantizing(model) -> None:
    """4-bit layers computing as a model being trained does (models/adapters.py `_keep_4bit_layout`): without
    bitsandbytes' CPU repacking, which under FSDP would repack the gathered copy only."""
    from ayar.models.adapters import four_bit_layers

    for _, layer in four_bit_layers(model):
        layer.support_avx512bf16_for_cpu = False


def _batch() -> dict:
    ids = torch.arange(3, 3 + 2 * 12).reshape(2, 12) % 50
    return {"input_ids": ids, "labels": ids.clone()}


def test_the_ranks_but_0_receive_their_parts_of_the_weights(tmp_path):
    """Under FSDP only rank 0 reads the weights: rank 1 builds the model empty (meta device) and receives its parts
    as the model is split; both then compute the loss the whole model gives, tied embeddings stay tied, and the
    rotary frequencies (a buffer no state dict holds) are rank 0's."""
    from ayar.models.device import choose_placement
    from ayar.models.load import load_model
    from ayar.training.loss import loss_sum

    model_dir = save_tiny(tmp_path / "tied", "llama", tie_word_embeddings=True)
    torch.multiprocessing.spawn(_split, args=(str(model_dir), free_port(), str(tmp_path)), nprocs=2)
    whole = load_model(str(model_dir), choose_placement("cpu", "float32"))
    with torch.no_grad():
        loss, n = loss_sum(whole, _batch())
    expected = float(loss) / n
    ranks = [torch.load(tmp_path / f"fulllora{r}.pt") for r in (0, 1)]
    for got in ranks:
        assert got["loss"] == pytest.approx(expected, rel=1e-6)
        assert got["tied"]
        assert len(got["rotary"]) >= 1
        for a, b in zip(got["rotary"], ranks[0]["rotary"], strict=True):
            assert torch.equal(a, b)
    assert torch.equal(ranks[0]["rotary"][0], whole.model.rotary_emb.inv_freq)


def test_the_ranks_but_0_receive_their_parts_of_a_4_bit_base(tmp_path):
    """QLoRA under FSDP with rank-0 loading: rank 0 loads and quantizes the base, rank 1 builds it empty in 4-bit
    and receives each layer's packed-weight shape and quant state (`four_bit_from_rank0`), then its parts of the
    packed weights as the model is split; both compute the loss the whole 4-bit model gives."""
    pytest.importorskip("bitsandbytes")
    from ayar.models.adapters import quantization_config
    from ayar.models.device import choose_placement
    from ayar.models.load import load_model
    from ayar.training.loss import loss_sum

    model_dir = save_tiny(tmp_path / "tied", "llama", tie_word_embeddings=True)
    args = (str(model_dir), free_port(), str(tmp_path), False, "full", "qlora")
    torch.multiprocessing.spawn(_split, args=args, nprocs=2)
    qconfig = quantization_config("qlora", torch.float32, torch.float32)
    whole = load_model(str(model_dir), choose_placement("cpu", "float32"), quantization_config=qconfig)
    _dequantizing(whole)
    with torch.no_grad():
        loss, n = loss_sum(whole, _batch())
    for r in (0, 1):
        assert torch.load(tmp_path / f"fullqlora{r}.pt")["loss"] == pytest.approx(float(loss) / n, rel=1e-6)


@pytest.mark.distributed
def test_each_rank_can_read_its_own_parts_of_the_weights_from_the_files(tmp_path):
    """`distributed.loading: parts`: both ranks build the model empty, a LoRA adapter is made on it as on the loaded
    model (the same initial values, though peft would make it empty), and each reads only its parts of the weights
    from the safetensors files (several, stored in bfloat16 and converted to the loaded float32): the loss the whole
    model gives, tied embeddings still tied, the rotary frequencies kept, and the adapter one process makes; split
    in full and hybrid (a 2-D mesh: replicated across nodes, one here). DoRA too: each process computes its part of
    the magnitude vectors from its rows of the weights, as peft computes them whole."""
    from ayar.config.schema import LoraConfig
    from ayar.models.adapters import apply_method
    from ayar.models.device import choose_placement
    from ayar.models.load import load_model
    from ayar.training.loss import loss_sum

    tied = save_tiny(tmp_path / "tied", "llama", tie_word_embeddings=True)
    model_dir = _stored_in_bf16(tied, tmp_path / "bf16", max_shard_size="10KB")
    assert len(list(model_dir.glob("*.safetensors"))) > 2
    runs = [("full", "lora"), ("hybrid", "lora"), ("full", "dora")]
    for split, method in runs:
        args = (str(model_dir), free_port(), str(tmp_path), True, split, method)
        torch.multiprocessing.spawn(_split, args=args, nprocs=2)
    for split, method in runs:
        whole = load_model(str(model_dir), choose_placement("cpu", "float32"))
        rotary = whole.model.rotary_emb.inv_freq.clone()
        torch.manual_seed(7)
        one = apply_method(whole, method, LoraConfig(r=4, dropout=0.0))
        with torch.no_grad():
            loss, n = loss_sum(one, _batch())  # LoRA's B starts at zero: the base model's loss
        expected = {k: v for k, v in one.state_dict().items() if "lora_" in k}
        assert any("magnitude" in k for k in expected) == (method == "dora")
        ranks = [torch.load(tmp_path / f"{split}{method}{r}.pt") for r in (0, 1)]
        for got in ranks:
            assert got["loss"] == pytest.approx(float(loss) / n, rel=1e-6)
            assert got["tied"] and len(got["rotary"]) >= 1
            assert torch.equal(got["rotary"][0], rotary)
        adapter = {k: v for k, v in ranks[0]["adapter"].items() if "lora_" in k}  # rank 0's, gathered whole
        assert adapter.keys() == expected.keys() and len(expected) > 0
        for k, v in expected.items():
            assert torch.equal(adapter[k], v), (split, method, k)


def _full_run(
    rank: int, model_dir: str, data: str, port: int, out: str, loading: str, file_bytes: int, method: str = "full"
) -> None:
    """One of two processes of a fine-tune (`method`) under FSDP that stops early (its eval loss made to rise after the
    first evaluation), as a launcher would start it; each records the whole weights at every evaluation."""
    from ayar.training import loop, sharding
    from ayar.training.sft import train_sft
    from tests.helpers import run_config

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), AYAR_HOME=f"{out}/home{rank}")
    sharding.MAX_FILE_BYTES = file_bytes
    sharding.CHUNK_BYTES = min(sharding.CHUNK_BYTES, file_bytes // 3)  # written in other pieces than the files
    real, seen = loop.evaluate, []

    def rising(model, *args):
        seen.append({k: p.full_tensor().clone() for k, p in model.named_parameters()})
        return real(model, *args) + len(seen) - 1

    loop.evaluate = rising
    cfg = run_config(
        model_dir, data, out, f"method={method}", "distributed.strategy=fsdp", f"distributed.loading={loading}",
        f"output.path={out}/{method}-{loading}-{file_bytes}", "data.val_ratio=0.25", "data.lint=warn",
        "training.batch_size=2",
        "training.max_steps=10", "training.eval_steps=1", "training.early_stopping_patience=2",
        "training.learning_rate=1e-3", "training.warmup_ratio=0", "training.threads=1",
    )  # fmt: skip
    train_sft(cfg)
    torch.save(seen, f"{out}/{method}-{loading}-{file_bytes}-seen{rank}.pt")


@pytest.mark.distributed
def test_a_full_fine_tune_under_fsdp_is_saved_by_parts(tmp_path):
    """A full fine-tune loaded by parts is saved by parts: each process writes its parts of every weight and rank 0
    joins them into the final files, one weight at a time; the best model (early stopping) is kept on disk by parts
    and put back. The folder holds what rank 0 saving the gathered model holds: the same weights (the best step's,
    the tied head once), config and files; split into several files, transformers' index names them (each process
    having written its parts in pieces other than the files); both load."""
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny(tmp_path / "tied", "llama", tie_word_embeddings=True)
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 2)
    big = 1 << 40
    for loading, file_bytes in (("rank0", big), ("parts", big), ("parts", 20_000)):
        args = (str(model_dir), str(data), free_port(), str(tmp_path), loading, file_bytes)
        torch.multiprocessing.spawn(_full_run, args=args, nprocs=2)
    whole, parts, files = (tmp_path / f"full-{name}" for name in (f"rank0-{big}", f"parts-{big}", "parts-20000"))
    for run in (whole, parts, files):
        meta = json.loads((run / "run.json").read_text())
        assert meta["stopped_early"] and meta["steps"] == 3 and meta["best_step"] == 1, meta
        assert meta["plan"]["saving"] == ("whole" if run == whole else "parts")
        assert sorted(p.name for p in (run / "checkpoints" / "best" / "sharded").glob("*.distcp")) == [
            "__0_0.distcp",
            "__1_0.distcp",
        ]
    seen = [torch.load(tmp_path / f"full-parts-{big}-seen{r}.pt") for r in (0, 1)]
    assert len(seen[0]) == 3 and all(torch.equal(seen[0][0][k], seen[1][0][k]) for k in seen[0][0])
    best = seen[0][0]  # the weights at the first evaluation (step 1), not those of step 3
    assert any(not torch.equal(best[k], seen[0][-1][k]) for k in best)
    assert "lm_head.weight" not in best  # tied: named once
    expected = load_file(whole / "model" / "model.safetensors")
    assert expected.keys() == best.keys()
    assert all(torch.equal(expected[k], best[k]) for k in best)
    assert sorted(p.name for p in (parts / "model").iterdir()) == sorted(p.name for p in (whole / "model").iterdir())
    got = load_file(parts / "model" / "model.safetensors")
    assert got.keys() == best.keys() and all(torch.equal(got[k], best[k]) for k in best)
    config = json.loads((whole / "model" / "config.json").read_text())
    assert json.loads((parts / "model" / "config.json").read_text()) == config
    assert config["dtype"] == "float32" and config["architectures"] == ["LlamaForCausalLM"]
    index = json.loads((files / "model" / "model.safetensors.index.json").read_text())
    names = sorted(set(index["weight_map"].values()))
    assert len(names) > 2 and sorted(p.name for p in (files / "model").glob("*.safetensors")) == names
    assert sorted(index["weight_map"]) == sorted(best)
    assert not (files / "model" / "sharded").exists()
    for run in (parts, files):
        model = AutoModelForCausalLM.from_pretrained(run / "model")
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert all(torch.equal(p, best[k]) for k, p in model.named_parameters())


def test_under_fsdp_early_stopping_keeps_the_best_adapter_by_parts(tmp_path):
    """LoRA under FSDP: the best adapter (step 1's) is kept on disk, each process its part, and put back before the
    adapter is gathered and saved; training had moved on since."""
    model_dir = save_tiny(tmp_path / "tied", "llama", tie_word_embeddings=True)
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 2)
    args = (str(model_dir), str(data), free_port(), str(tmp_path), "parts", 1 << 40, "lora")
    torch.multiprocessing.spawn(_full_run, args=args, nprocs=2)
    run = tmp_path / f"lora-parts-{1 << 40}"
    meta = json.loads((run / "run.json").read_text())
    assert meta["stopped_early"] and meta["steps"] == 3 and meta["best_step"] == 1, meta
    assert (run / "checkpoints" / "best" / "sharded").is_dir()
    seen = torch.load(tmp_path / f"lora-parts-{1 << 40}-seen0.pt")
    best = {k.replace(".default", ""): v for k, v in seen[0].items() if "lora_" in k}
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == best.keys() and len(best) > 0
    assert all(torch.equal(saved[k], best[k]) for k in best)
    last = {k.replace(".default", ""): v for k, v in seen[-1].items() if "lora_" in k}
    assert any(not torch.equal(best[k], last[k]) for k in best)


def _scaler_step(rank: int, port: int, out: str) -> None:
    """One of two processes: a loss-scaled step (fused AdamW, as ayar builds it on CPU) where rank 1's gradient
    overflows and rank 0's does not."""
    import torch.distributed as dist

    from ayar.training.sharding import _AgreedScaler

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([w], lr=0.1, fused=True)
    scaler = _AgreedScaler("cpu")
    scaler.scale((w * (float("inf") if rank == 1 else 2.0)).sum()).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    torch.save({"w": w.detach().clone(), "scale": scaler.get_scale()}, f"{out}/scaler{rank}.pt")
    dist.destroy_process_group()


def test_under_fsdp_a_gradient_overflow_in_one_process_skips_the_step_in_all(tmp_path):
    """fp16 compute under FSDP: each process holds a part of the gradients, so an overflow one finds skips the step
    everywhere, and every process lowers its scale alike (else the split weights would part ways)."""
    torch.multiprocessing.spawn(_scaler_step, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"scaler{rank}.pt")
        assert torch.equal(got["w"], torch.ones(3)) and got["scale"] == 2.0**15, (rank, got)


@pytest.mark.distributed
def test_fp16_compute_under_fsdp_trains_what_data_parallel_does(tiny_model_dir, tmp_path):
    """A full fine-tune under fp16 autocast with a loss whose gradients underflow fp16 unless scaled: FSDP (the scale
    agreed across processes) gives the data-parallel run's gradient norms and losses, and neither is ~0."""
    from tests.unit.training.test_training import TINY_LOSS

    (tmp_path / "losses.py").write_text(TINY_LOSS)
    data = write_jsonl(tmp_path / "d.jsonl", (MATH_ROWS * 4)[:43])
    common = [f"model.name={tiny_model_dir}", "model.dtype=float16", "method=full", f"data.train={data}",
              "data.val_ratio=0", "data.lint=warn", "training.max_steps=4", "training.warmup_ratio=0",
              "training.tracker=none", "training.threads=1", "training.batch_size=4",
              f"training.loss={tmp_path / 'losses.py'}:tiny", "--nproc", "2"]  # fmt: skip
    for name, extra in {"ddp": [], "fsdp": ["distributed.strategy=fsdp"]}.items():
        done = _train([*common, f"output.path={tmp_path / name}", *extra], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    steps = {
        name: [(r["grad_norm"], r["loss"], r["loss_scale"]) for r in map(json.loads, (tmp_path / name /
               "metrics.jsonl").read_text().splitlines()) if "grad_norm" in r]
        for name in ("ddp", "fsdp")
    }  # fmt: skip
    assert len(steps["ddp"]) == 4 and min(norm for norm, _, _ in steps["ddp"]) > 1e-7
    for (a, la, sa), (b, lb, sb) in zip(steps["ddp"], steps["fsdp"]):
        assert b == pytest.approx(a, rel=1e-3) and lb == pytest.approx(la, rel=1e-3) and sa == sb


def test_a_trainer_stage_asks_accelerate_for_fsdp2_by_decoder_layer_with_sharded_checkpoints(tmp_path, monkeypatch):
    """strategy fsdp for a Trainer stage: TrainingArguments carry accelerate's FSDP plugin arguments (FSDP2, a unit
    per decoder layer, sharded checkpoints, offload when asked, rank 0's weights sent to the others), which
    accelerate's plugin accepts."""
    for name in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING"):  # set by the arguments: restored after
        monkeypatch.setenv(name, "false")
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    from ayar.config import load_config
    from ayar.models.device import Placement
    from ayar.training.plan import RunPlan
    from ayar.training.trl_stage import training_kwargs

    for offload in (False, True):
        cfg = load_config(
            None, ["stage=dpo", "distributed.strategy=fsdp", f"distributed.offload={str(offload).lower()}"]
        )
        plan = RunPlan(Placement("cpu", torch.float32, "test"), world_size=8, strategy="fsdp")
        args = TrainingArguments(**training_kwargs(cfg, SimpleNamespace(checkpoints=tmp_path), plan))
        got = args.fsdp_plugin_args
        assert got["fsdp_version"] == 2 and got["reshard_after_forward"] is True
        assert got["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and "transformer_cls_names_to_wrap" not in got
        assert got["state_dict_type"] == "SHARDED_STATE_DICT" and got.get("cpu_offload", False) is offload
        assert got["cpu_ram_efficient_loading"] is True  # rank 0's weights sent to the others, which hold none
        assert "deepspeed" not in training_kwargs(cfg, SimpleNamespace(checkpoints=tmp_path), plan)
        plugin = FullyShardedDataParallelPlugin(**got)
        assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "SHARDED_STATE_DICT"
        assert plugin.cpu_ram_efficient_loading


def test_a_trainer_stage_under_fsdp_loads_the_model_into_cpu_ram_on_gpus_too(monkeypatch, tmp_path):
    """accelerate's FSDP2 (`fully_shard`) moves each part to its GPU: loaded into CPU RAM first, no GPU ever holds
    the whole model (the Trainer leaves an FSDP model where it is); with rank-0 loading by rank 0 alone (the others
    build it empty and receive their parts); data parallel loads onto the GPU, every rank."""
    from ayar.config import load_config
    from ayar.models.device import Placement
    from ayar.training import preference, trl_stage
    from ayar.training.plan import RunPlan
    from tests.unit.training.test_stages import PAIRS

    class Loading(Exception):
        pass

    def load(model_cfg, placement, empty=False, **kwargs):
        raise Loading(placement, empty)

    monkeypatch.setattr("ayar.models.load.load_model_and_tokenizer", load)  # what the recipe loads through
    # the rank's decision without its process group: loading (the stub) stops the run before any collective
    monkeypatch.setattr(trl_stage.distributed, "start", lambda plan: trl_stage.distributed.World())
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS[:8])
    for strategy, rank, loading, device, empty in (("fsdp", 0, "rank0", "cpu", False),
                                                   ("fsdp", 1, "rank0", "cpu", True),
                                                   ("fsdp", 1, "every_rank", "cpu", False),
                                                   ("ddp", 1, "rank0", "cuda", False)):  # fmt: skip
        plan = RunPlan(Placement("cuda", torch.bfloat16, "test"), world_size=2, rank=rank, strategy=strategy,
                       loading=loading)  # fmt: skip
        monkeypatch.setattr(trl_stage, "decide", lambda cfg: plan)
        out = tmp_path / f"{strategy}{rank}{loading}"
        cfg = load_config(None, ["stage=dpo", f"data.train={data}", f"output.path={out}"])
        with pytest.raises(Loading) as loading:
            trl_stage.run_stage(cfg, preference.STAGE)
        placement, got_empty = loading.value.args
        assert (placement.device, placement.dtype, got_empty) == (device, torch.bfloat16, empty)


def _stored_in_bf16(src, dst, **save):
    """The model at `src` saved again with its weights in bfloat16 (loaded in float32, it is converted); `save`:
    save_pretrained's arguments (max_shard_size)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(dst, **save)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def test_the_plan_decides_which_processes_read_the_weights(tiny_model_dir, tmp_path, monkeypatch):
    """Under FSDP: our own loop has each rank read its own parts from the files where they hold every weight by
    name, else rank 0 alone; a Trainer stage loads on rank 0 alone where the weights are converted as they load
    (each process would hold its own converted copy), not where the file is in the loaded dtype (the processes map
    the same file). Decided in the plan, recorded in run.json, passed to accelerate; `distributed.loading` decides
    otherwise where asked, and `parts` where it cannot work is refused with the way out."""
    import shutil
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from ayar.config import load_config
    from ayar.errors import AyarError
    from ayar.training.plan import decide
    from ayar.training.trl_stage import training_kwargs

    bf16 = _stored_in_bf16(tiny_model_dir, tmp_path / "bf16")
    short = shutil.copytree(tiny_model_dir, tmp_path / "short")  # its files lack one weight
    weights = load_file(short / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.1.mlp.up_proj" not in k}, short / "model.safetensors")
    missing = tmp_path / "missing"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for name in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING"):  # set by the arguments: restored after
        monkeypatch.setenv(name, "false")

    def config(stage, model, loading, *more):
        return load_config(None, [f"stage={stage}", f"model.name={model}", "model.device=cpu", "model.dtype=float32",
                                  "distributed.strategy=fsdp", f"distributed.loading={loading}", *more])  # fmt: skip

    cases = [("sft", tiny_model_dir, "auto", "parts"), ("sft", bf16, "auto", "parts"), ("sft", short, "auto", "rank0"),
             ("sft", missing, "auto", "rank0"), ("sft", tiny_model_dir, "rank0", "rank0"),
             ("sft", tiny_model_dir, "every_rank", "every_rank"), ("dpo", tiny_model_dir, "auto", "every_rank"),
             ("dpo", bf16, "auto", "rank0"), ("reward", bf16, "auto", "rank0"), ("dpo", missing, "auto", "rank0"),
             ("dpo", tiny_model_dir, "rank0", "rank0"), ("dpo", bf16, "every_rank", "every_rank")]  # fmt: skip
    for stage, model, loading, expected in cases:
        cfg = config(stage, model, loading)
        plan = decide(cfg)
        assert (plan.loading, plan.reads_weights) == (expected, expected == "every_rank"), (stage, model, loading)
        assert plan.summary()["loading"] == expected
        assert plan.parts_from == (str(model) if expected == "parts" else None)
        if stage != "sft":
            args = training_kwargs(cfg, SimpleNamespace(checkpoints=tmp_path), plan)
            assert args["fsdp_config"]["cpu_ram_efficient_loading"] is (expected == "rank0")
    # DoRA's magnitudes are computed from each process's rows of linear layers; GPT-2's Conv1D stores them transposed
    import transformers as tf

    gpt2 = tmp_path / "gpt2"
    tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).save_pretrained(
        gpt2
    )
    assert decide(config("sft", tiny_model_dir, "auto", "method=dora")).loading == "parts"
    assert decide(config("sft", gpt2, "auto", "method=dora")).loading == "rank0"
    assert decide(config("sft", gpt2, "auto")).loading == "parts"
    refused = [(("sft", short, "parts"), "do not hold model.layers.1.mlp.up_proj.weight"),
               (("sft", missing, "parts"), "not a model folder"),
               (("sft", gpt2, "parts", "method=dora"), "DoRA on Conv1D layers needs their whole weights"),
               (("dpo", tiny_model_dir, "parts"), "for ayar's own loop")]  # fmt: skip
    for args, message in refused:
        with pytest.raises(AyarError, match=message) as e:
            decide(config(*args))
        assert "distributed.loading" in str(e.value)


def _stage_args(stage, tmp_path, tiny_model_dir):
    return [f"model.name={tiny_model_dir}", "model.dtype=float32", *stage_inputs(stage, tmp_path),
            "data.val_ratio=0.25", "training.warmup_ratio=0", "lora.dropout=0", "training.learning_rate=0.01",
            "training.tracker=none", "--nproc", "2"]  # fmt: skip


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["dpo", "reward", "grpo", "classification"])
def test_a_trainer_stage_under_fsdp_trains_the_data_parallel_adapter(tiny_model_dir, tmp_path, stage):
    """DPO, a reward model, GRPO (its sampling included) and a classifier in 2 processes on accelerate's FSDP plugin
    (on this CPU too: ayar lifts accelerate's accelerator-only gate, training/sharding.py): the adapter (and score
    head) of the data-parallel run, its held-out measurement before training, and checkpoints split a part per
    rank; with rank 0 alone reading the weights (DPO, reward, the classifier) and with every process reading them
    (GRPO)."""
    # from a file in bfloat16 (converted as it loads: rank 0 alone reads it; the classifier's adapter is made on the
    # others' empty model, models/adapters.py), GRPO from one in float32 (every process maps it)
    rank0 = stage in ("dpo", "reward", "classification")
    model = _stored_in_bf16(tiny_model_dir, tmp_path / "bf16") if rank0 else tiny_model_dir
    common = [*_stage_args(stage, tmp_path, model), "training.max_steps=3"]
    if stage == "classification":  # with dropout: the same masks as data parallel
        common.append("lora.dropout=0.1")
    for name, extra in {"ddp": [], "fsdp": ["distributed.strategy=fsdp", "training.save_steps=3"]}.items():
        done = _train([*common, f"output.path={tmp_path / name}", *extra], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    ref = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 0  # it trained
    assert got.keys() == ref.keys()
    for k in ref:  # gradients reduce-scattered instead of all-reduced: float sums in another order
        torch.testing.assert_close(got[k], ref[k], atol=1e-4, rtol=1e-3)
    meta, ref_meta = (json.loads((tmp_path / n / "run.json").read_text()) for n in ("fsdp", "ddp"))
    assert meta["plan"]["strategy"] == "fsdp" and meta["status"] == "completed"
    assert len(meta["peak_rss_mb_per_rank"]) == 2 and min(meta["peak_rss_mb_per_rank"]) > 0
    assert len(meta["training_peak_rss_mb_per_rank"]) == 2 and min(meta["training_peak_rss_mb_per_rank"]) > 0
    assert meta["plan"]["loading"] == ("rank0" if rank0 else "every_rank")
    if stage != "dpo":
        assert meta["before"] and meta["before"].keys() == ref_meta["before"].keys()
        assert meta["before"] == pytest.approx(ref_meta["before"], rel=1e-4)
    parts = sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints" / "checkpoint-3").glob("*/*.distcp"))
    assert parts == ["__0_0.distcp", "__0_0.distcp", "__1_0.distcp", "__1_0.distcp"]  # model and optimizer


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["dpo", "reward", "classification"])
def test_a_bf16_trainer_stage_under_fsdp_computes_as_data_parallel(tiny_model_dir, tmp_path, stage):
    """Under mixed precision (bf16) accelerate's FSDP plugin computes as its data parallel does: the weights keep
    ayar's dtypes, autocast computes, the outputs are converted to fp32 (training/sharding.py `accelerate_fsdp`,
    `outputs_in_fp32`), a task head trains in fp32 under both. With accelerate's own bf16 policy (adapters computed
    and their gradients summed in bf16, bf16 logits and scores into the loss) DPO's first loss was bf16's ln 2
    (0.6914) and the adapters of all three stages were 0.005-0.02 off data parallel's."""
    common = [a for a in _stage_args(stage, tmp_path, tiny_model_dir) if not a.startswith("model.dtype=")]
    common += ["model.dtype=bfloat16", "training.max_steps=3"]
    for name, extra in {"ddp": [], "fsdp": ["distributed.strategy=fsdp"]}.items():
        done = _train([*common, f"output.path={tmp_path / name}", *extra], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-6)
    ref = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 0  # it trained
    assert got.keys() == ref.keys() and {v.dtype for v in got.values()} == {torch.float32}
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["dpo", "reward", "grpo", "classification"])
def test_a_trainer_stage_with_qlora_under_fsdp_trains_the_data_parallel_adapter(tiny_model_dir, tmp_path, stage):
    """DPO, a reward model, GRPO (sampling from the split 4-bit base) and a classifier over a 4-bit base on
    accelerate's FSDP plugin, the packed 4-bit bytes split with the rest (stored as floats: bitsandbytes'
    FSDP-QLoRA), in 2 processes: the data-parallel run's adapter."""
    pytest.importorskip("bitsandbytes")
    common = [*_stage_args(stage, tmp_path, tiny_model_dir), "training.max_steps=3", "method=qlora"]
    for name, extra in {"ddp": [], "fsdp": ["distributed.strategy=fsdp"]}.items():
        done = _train([*common, f"output.path={tmp_path / name}", *extra], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    ref = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 0  # it trained
    # gradients reduce-scattered: an element whose gradient is ~0 may move by AdamW's step either way (GRPO's)
    assert_same_adapters(tmp_path / "ddp", tmp_path / "fsdp", split=True)
    plan = json.loads((tmp_path / "fsdp" / "run.json").read_text())["plan"]
    assert (plan["strategy"], plan["quantized"], plan["loading"]) == ("fsdp", True, "every_rank")


@pytest.mark.distributed
def test_a_trainer_stage_resumes_its_sharded_checkpoint(tiny_model_dir, tmp_path):
    """DPO under FSDP killed after its step-2 checkpoint and resumed with `--resume --nproc 2`: steps 3-4 and the
    adapter as the run that went on."""
    import shutil

    run = tmp_path / "run"
    args = [*_stage_args("dpo", tmp_path, tiny_model_dir), "training.max_steps=4", "training.save_steps=2",
            "distributed.strategy=fsdp", f"output.path={run}"]  # fmt: skip
    done = _train(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ref_losses, ref = losses(run), load_file(run / "adapter" / "adapter_model.safetensors")
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run / "adapter")
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "status": "running"}))
    resumed = _train(["--resume", str(run), "--nproc", "2"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # from the checkpoint, not over again (a run started over would give the same losses too)
    assert f"resume {run}" in resumed.stderr and "starting it over" not in resumed.stderr
    assert "step 1/4" not in resumed.stderr and "step 4/4" in resumed.stderr
    assert losses(run) == pytest.approx(ref_losses, rel=1e-6) and len(ref_losses) == 4
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5)
