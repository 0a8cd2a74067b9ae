"""The run plan (training/plan.py): decided once at setup, recorded in run.json, read by the loop and the loss."""

from __future__ import annotations

import pytest
import torch

from ayar.config import load_config
from ayar.training.plan import decide, launcher_world
from tests.helpers import MATH_ROWS, tiny_train_config, write_jsonl


def test_full_fine_tuning_in_half_precision_keeps_fp32_weights_and_autocasts():
    plan = decide(load_config(None, ["method=full", "model.device=cpu", "model.dtype=bfloat16"]))
    assert plan.placement.dtype == torch.float32 and plan.autocast == torch.bfloat16
    lora = decide(load_config(None, ["model.device=cpu", "model.dtype=bfloat16"]))
    assert lora.placement.dtype == torch.bfloat16 and lora.autocast is None
    assert decide(load_config(None, ["method=qlora", "model.device=cpu"])).quantized


def test_world_size_and_rank_come_from_the_launcher(monkeypatch):
    assert launcher_world() == (1, 0) or "WORLD_SIZE" in __import__("os").environ
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    plan = decide(load_config(None, ["model.device=cpu"]))
    assert (plan.world_size, plan.rank, plan.is_main) == (4, 2, False)


def _spy_on_the_loss(monkeypatch) -> list:
    """(fused, autocast) of every loss the loop asks for, recorded as the training runs."""
    from ayar.training import loop, loss

    seen, real = [], loss.loss_sum

    def spy(model, batch, loss_fn=None, fused=False, autocast=None):
        seen.append((fused, autocast))
        return real(model, batch, loss_fn, fused, autocast)

    monkeypatch.setattr(loss, "loss_sum", spy)  # training passes (training/distributed.py Replicas)
    monkeypatch.setattr(loop, "loss_sum", spy)
    return seen


@pytest.mark.parametrize("fused", [True, False])
def test_the_loop_runs_the_plan_it_was_handed(tiny_model_dir, tmp_path, monkeypatch, fused):
    """The plan's layout is what run.json records and what the loss is asked to run: nothing re-decides."""
    from ayar.training.sft import train_sft

    seen = _spy_on_the_loss(monkeypatch)
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    cfg = tiny_train_config(tiny_model_dir, data, tmp_path / "runs", max_steps=2)
    cfg.training.fused = fused
    meta = train_sft(cfg).read_meta()
    assert meta["plan"]["device"] == "cpu" and meta["plan"]["world_size"] == 1 and meta["plan"]["autocast"] is None
    assert meta["passes"]["fused"] is (fused and meta["passes"]["padding_free"])
    # training passes take the fused decoder exactly when the plan says so (evaluation batches are padded)
    assert (True in {f for f, _ in seen}) is meta["passes"]["fused"] and {a for _, a in seen} == {None}


def test_full_fine_tuning_autocast_reaches_the_loss(tiny_model_dir, tmp_path, monkeypatch):
    from ayar.training.sft import train_sft

    calls = _spy_on_the_loss(monkeypatch)
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    cfg = tiny_train_config(tiny_model_dir, data, tmp_path / "runs", max_steps=1)
    cfg.method, cfg.model.dtype = "full", "bfloat16"
    meta = train_sft(cfg).read_meta()
    assert meta["plan"]["autocast"] == "bfloat16" and meta["dtype"] == "float32"
    assert calls and {autocast for _, autocast in calls} == {torch.bfloat16}


def test_the_plan_on_a_gpu(tiny_model_dir, monkeypatch):
    """What a run decides on CUDA, without one (CUDA faked; not yet run on a GPU): bf16 where the GPU has it (else
    fp16), full fine-tuning as fp32 master weights under autocast, the whole micro-batch in one pass, padding-free
    only when packing is asked for (flash-attention takes packed rows; ayar's per-example CPU attention is off), the
    fused CPU decoder off, Liger's kernels when installed, nccl for several processes."""
    from ayar.kernels import liger
    from ayar.models.load import load_model_and_tokenizer
    from tests.helpers import examples

    model, tok, _, _ = load_model_and_tokenizer(  # before CUDA is faked (libraries probe it as they import)
        load_config(None, [f"model.name={tiny_model_dir}"]).model,
        decide(load_config(None, ["model.device=cpu"])).placement,
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(liger, "installed", lambda: True)
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.device=cuda", "training.memory_check=off"])
    plan = decide(cfg)
    assert (plan.device, plan.placement.dtype, plan.autocast, plan.liger) == ("cuda", torch.bfloat16, None, True)
    full = decide(load_config(None, [f"model.name={tiny_model_dir}", "model.device=cuda", "method=full"]))
    assert full.placement.dtype == torch.float32 and full.autocast == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert decide(cfg).placement.dtype == torch.float16
    passes = plan.with_passes(cfg, model, examples(tok), lambda *_: None)
    assert passes.layout.per_pass == 0 and not passes.layout.packed and not passes.layout.fused
    packed = load_config(None, [f"model.name={tiny_model_dir}", "model.device=cuda", "training.memory_check=off",
                                "training.packing=true"])  # fmt: skip
    on_gpu = decide(packed).with_passes(packed, model, examples(tok), lambda *_: None)
    assert on_gpu.layout.packed and not on_gpu.layout.fused, on_gpu.not_fused_because
    assert "CPU only" in on_gpu.not_fused_because


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_fused_decoders_layer_plan_is_built_only_for_a_run_that_takes_it(tiny_model_dir, monkeypatch, strategy):
    """Building it restacks q/k/v and gate/up into new tensors and holds them: under FSDP, which does not take it,
    that would keep a copy of those weights (and the loaded ones) for the whole run."""
    from ayar.kernels import base_model
    from ayar.models.adapters import apply_method
    from ayar.models.load import load_model_and_tokenizer
    from tests.helpers import examples

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.device=cpu", "model.dtype=float32",
                             f"distributed.strategy={strategy}", "training.memory_check=off"])  # fmt: skip
    plan = decide(cfg)
    model, tok, _, _ = load_model_and_tokenizer(cfg.model, plan.load_placement, log=lambda *_: None)
    model = apply_method(model, cfg.method, cfg.lora)
    q = base_model(model).get_decoder().layers[0].self_attn.q_proj
    loaded = q.base_layer.weight.data_ptr()
    plan = plan.with_passes(cfg, model, examples(tok))
    assert plan.layout.fused is (strategy == "ddp")
    assert hasattr(base_model(model), "_ayar_fused_plan") is (strategy == "ddp")
    assert (q.base_layer.weight.data_ptr() == loaded) is (strategy == "fsdp")


def test_freed_memory_is_returned_as_asked_or_when_the_kept_heap_could_outgrow_the_machine():
    from ayar.training.memory import MemoryPlan, Sharding
    from ayar.training.plan import return_memory

    plan = MemoryPlan({"weights": 45}, available=100)  # 2x its size fits, 2.5x does not
    assert not return_memory(None, plan) and not return_memory(None, plan, Sharding(2, "ddp"))
    assert return_memory(None, plan, Sharding(2, "fsdp"))  # FSDP's gathered-and-freed layers keep more heap
    assert return_memory(None, MemoryPlan({"weights": 55}, available=100))
    assert return_memory(True, plan) and not return_memory(False, MemoryPlan({"weights": 90}, available=100))


def test_more_processes_on_a_machine_than_its_gpus_are_refused_before_loading(tiny_model_dir, monkeypatch):
    """Each CUDA process takes the GPU numbered by its LOCAL_RANK (CUDA faked; not yet run on a GPU): 4 processes
    on a machine showing 2 GPUs would stop in torch after the launch ("invalid device ordinal")."""
    from ayar.errors import AyarError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "RANK": "0", "CUDA_VISIBLE_DEVICES": "0,1"}.items():
        monkeypatch.setenv(name, value)
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.device=cuda", "training.memory_check=off"])
    with pytest.raises(AyarError, match=r"4 training processes on this machine, but it shows 2 GPU\(s\) "
                       r"\(CUDA_VISIBLE_DEVICES=0,1\): start one per GPU \(ayar train --nproc 2"):  # fmt: skip
        decide(cfg)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 4 machines of 2
    assert decide(cfg).world_size == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # each process shown its own GPU (Slurm's --gpus-per-task 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert decide(cfg).world_size == 8
