"""DeepSpeed ZeRO for the Trainer-based stages (`distributed.strategy: deepspeed`, training/zero.py): the config ayar
writes is accepted by DeepSpeed's own config class, and DPO under ZeRO-2 / ZeRO-3 in 2 processes on this CPU
(DeepSpeed's CPU accelerator, gloo) trains the adapter the data-parallel run trains."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import write_jsonl
from tests.unit.training.test_distributed import _train


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
    written = deepspeed_config(cfg, _plan(world_size=1, dtype=torch.bfloat16, device="cuda"))
    ds = DeepSpeedConfig(json.loads(json.dumps(written)))  # as read back from the JSON a user would keep
    assert ds.zero_optimization_stage == stage and ds.zero_enabled
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps, ds.train_batch_size) == (4, 2, 8)
    assert ds.gradient_clipping == 0.5 and ds.bfloat16_config.enabled and not ds.float16_config.enabled
    assert ds.zero_config.offload_optimizer is not None if offload else ds.zero_config.offload_optimizer is None
    assert (ds.zero_config.offload_param is not None) == (offload and stage == 3)
    # DeepSpeed's own consistency check: the global batch is micro-batch x accumulation x processes
    bad = {**written, "train_batch_size": 7}
    with pytest.raises(AssertionError, match="train_batch_size"):
        DeepSpeedConfig(bad)


def test_the_own_loop_points_to_fsdp_and_a_missing_deepspeed_is_named(monkeypatch):
    import sys

    from ayar.config import load_config
    from ayar.errors import AyarError
    from ayar.training.plan import decide

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(AyarError, match="own loop .* with distributed.strategy: fsdp"):
        decide(load_config(None, ["distributed.strategy=deepspeed", "model.device=cpu"]))
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as where it is not installed: import fails
    with pytest.raises(AyarError, match=r"needs DeepSpeed, which is not installed: pip install -e '.\[deepspeed\]'"):
        decide(load_config(None, ["distributed.strategy=deepspeed", "model.device=cpu", "stage=dpo"]))


@pytest.mark.distributed
def test_dpo_under_zero_2_and_3_trains_the_data_parallel_adapter(tiny_model_dir, tmp_path):
    """DPO, 2 processes, 3 steps: ZeRO-2 and ZeRO-3 (weights split too, gathered whole to save) give the adapter
    the DDP run gives; the checkpoints are DeepSpeed's, one part per rank."""
    from tests.unit.training.test_stages import PAIRS

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS[:8])
    common = [f"model.name={tiny_model_dir}", "model.dtype=float32", f"data.train={data}", "stage=dpo",
              "training.batch_size=2", "data.val_ratio=0.25", "training.max_steps=3", "training.warmup_ratio=0",
              "training.learning_rate=0.01", "training.tracker=none", "--nproc", "2"]  # fmt: skip
    runs = {
        "ddp": [],
        "zero2": ["distributed.strategy=deepspeed", "training.save_steps=3"],
        "zero3": ["distributed.strategy=deepspeed", "distributed.zero_stage=3"],
    }
    for name, extra in runs.items():
        done = _train([*common, f"output.path={tmp_path / name}", *extra], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    ref = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 0  # it trained
    for name in ("zero2", "zero3"):
        got = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
        assert got.keys() == ref.keys()
        # AdamW moves a weight whose gradient is ~0 by up to the learning rate (0.01) whatever the gradient's
        # float rounding: an odd element differs by ~1e-4 (one in 512 seen); on average they agree to < 1e-6
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-3, rtol=0)
        assert sum(float((got[k] - ref[k]).abs().sum()) for k in ref) / sum(v.numel() for v in ref.values()) < 1e-6
        assert json.loads((tmp_path / name / "run.json").read_text())["plan"]["strategy"] == "deepspeed"
    parts = sorted(p.name for p in (tmp_path / "zero2" / "checkpoints").glob("checkpoint-3/global_step3/*optim*"))
    assert parts == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
