"""training/launch.py: what `accelerate launch` tells the processes it starts (its flags and its own config file,
as accelerate's own launcher writes them into their environment) becomes the run's config, once; what cannot be
run, or contradicts the config, stops the run with the flag named."""

import json
import os

import pytest
import torch

from ayar.config import TrainConfig
from ayar.errors import ConfigError
from ayar.training.launch import from_accelerate_launch


def launched_env(argv: list[str], monkeypatch, tmp_path) -> dict:
    """The environment accelerate launch's own code gives the processes `accelerate launch ARGV -m ayar train c.yaml`
    starts (its start of torchrun replaced by a look at the environment). This machine's accelerate config file, if
    any, is not read: a test gives its own with --config_file."""
    import accelerate.commands.launch as acc
    import torch.distributed.run as distrib_run

    seen = {}

    class Started:  # one process started without torchrun (accelerate's simple launcher)
        returncode = 0

        def __init__(self, cmd, env):
            seen.update(env)

        def wait(self):
            return 0

    monkeypatch.setattr(acc, "default_config_file", str(tmp_path / "no-accelerate-config.yaml"))
    monkeypatch.setattr(distrib_run, "run", lambda args: seen.update(os.environ))
    monkeypatch.setattr(acc.subprocess, "Popen", Started)
    acc.launch_command(acc.launch_command_parser().parse_args([*argv, "-m", "ayar", "train", "c.yaml"]))
    assert seen, "accelerate launch started no processes"
    return seen


TWO = ["--num_processes", "2", "--num_machines", "1"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--multi_gpu"], {}),
        (["--use_fsdp"], {"distributed.strategy": "fsdp"}),
        (
            ["--use_fsdp", "--fsdp_sharding_strategy", "HYBRID_SHARD", "--fsdp_offload_params", "true",
             "--fsdp_activation_checkpointing", "true"],
            {"distributed.strategy": "fsdp", "distributed.shard": "hybrid", "distributed.offload": True,
             "training.gradient_checkpointing": True},
        ),
        (
            ["--use_deepspeed", "--zero_stage", "3", "--offload_optimizer_device", "cpu",
             "--gradient_accumulation_steps", "4", "--gradient_clipping", "0.5"],
            {"distributed.strategy": "deepspeed", "distributed.zero_stage": 3, "distributed.offload": True,
             "training.grad_accum": 4, "training.max_grad_norm": 0.5},
        ),
        (["--multi_gpu", "--mixed_precision", "bf16"], {"model.dtype": "bfloat16"}),
        (["--cpu", "--mixed_precision", "fp16"], {"model.dtype": "float16", "model.device": "cpu"}),
    ],
)  # fmt: skip
def test_accelerate_launch_flags_become_the_runs_config(argv, expected, monkeypatch, tmp_path):
    env = launched_env([*argv, *TWO], monkeypatch, tmp_path)
    cfg, notes = from_accelerate_launch(TrainConfig(), env=env)
    want = TrainConfig()
    for path, value in expected.items():
        section, name = path.split(".")
        setattr(getattr(want, section), name, value)
    assert cfg == want
    assert bool(notes) == bool(expected) and all(path in notes[0] for path in expected)
    # read once: nothing below (transformers' TrainingArguments, accelerate's state) reads them again its own way
    assert not [k for k in env if k.startswith(("ACCELERATE_USE_", "ACCELERATE_DEEPSPEED_", "FSDP_"))]
    assert "ACCELERATE_MIXED_PRECISION" not in env


def test_accelerates_own_config_file_is_read_as_its_flags(monkeypatch, tmp_path):
    """What `accelerate config` wrote (accelerate launch --config_file, or its default file) says the same as flags."""
    config = tmp_path / "fsdp.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nmixed_precision: bf16\nnum_machines: 1\n"
        "num_processes: 2\nmachine_rank: 0\nuse_cpu: false\n"
        "fsdp_config:\n  fsdp_version: 2\n  fsdp_offload_params: true\n  fsdp_reshard_after_forward: true\n"
    )
    cfg, _ = from_accelerate_launch(
        TrainConfig(), env=launched_env(["--config_file", str(config)], monkeypatch, tmp_path)
    )
    assert (cfg.distributed.strategy, cfg.distributed.offload, cfg.model.dtype) == ("fsdp", True, "bfloat16")
    # accelerate's FSDP1 spelling: the strategy's name in fsdp_reshard_after_forward
    config.write_text(config.read_text().replace("fsdp_version: 2", "fsdp_version: 1").replace(
        "fsdp_reshard_after_forward: true", "fsdp_reshard_after_forward: HYBRID_SHARD"))  # fmt: skip
    cfg, _ = from_accelerate_launch(
        TrainConfig(), env=launched_env(["--config_file", str(config)], monkeypatch, tmp_path)
    )
    assert (cfg.distributed.strategy, cfg.distributed.shard) == ("fsdp", "hybrid")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("multi_gpu", {"model.dtype": "bfloat16"}),
        ("fsdp1", {"distributed.strategy": "fsdp", "model.dtype": "bfloat16"}),
        ("fsdp2", {"distributed.strategy": "fsdp", "model.dtype": "bfloat16"}),
        ("zero2", {"distributed.strategy": "deepspeed", "model.dtype": "bfloat16"}),
        ("zero3", {"distributed.strategy": "deepspeed", "distributed.zero_stage": 3, "model.dtype": "bfloat16"}),
        ("zero1", "ZeRO stage 1"),
    ],
)
def test_trls_own_accelerate_configs_run_as_they_say(name, expected, monkeypatch, tmp_path):
    """The accelerate config files TRL ships (trl/accelerate_configs, what its docs tell users to launch with:
    `accelerate launch --config_file zero3.yaml ...`), as they are installed here. zero1 is refused: ayar runs
    ZeRO-2 or 3."""
    from importlib.resources import files

    config = files("trl") / "accelerate_configs" / f"{name}.yaml"
    argv = ["--config_file", str(config), "--num_processes", "2"]
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            from_accelerate_launch(TrainConfig(), env=launched_env(argv, monkeypatch, tmp_path))
        return
    cfg, _ = from_accelerate_launch(TrainConfig(), env=launched_env(argv, monkeypatch, tmp_path))
    want = TrainConfig()
    for path, value in expected.items():
        section, field = path.split(".")
        setattr(getattr(want, section), field, value)
    assert cfg == want


def test_a_config_that_says_otherwise_stops_the_run(monkeypatch, tmp_path):
    """Where the config and the launcher name different values neither is taken: the error names the flag, the
    field and both values. The launcher's own defaults (FULL_SHARD, written for every --use_fsdp) leave the config's
    choice alone."""
    cfg = TrainConfig()
    cfg.distributed.strategy = "deepspeed"
    with pytest.raises(ConfigError, match=r"--use_fsdp \(distributed.strategy: fsdp\), but the config says "
                       r"distributed.strategy: deepspeed"):  # fmt: skip
        from_accelerate_launch(cfg, env=launched_env(["--use_fsdp", *TWO], monkeypatch, tmp_path))
    cfg.distributed.strategy, cfg.distributed.zero_stage = "deepspeed", 3
    with pytest.raises(ConfigError, match="--zero_stage 2"):
        from_accelerate_launch(
            cfg, env=launched_env(["--use_deepspeed", "--zero_stage", "2", *TWO], monkeypatch, tmp_path)
        )
    cfg = TrainConfig()
    cfg.model.dtype = "float32"
    with pytest.raises(ConfigError, match="--mixed_precision bf16.*model.dtype: float32"):
        from_accelerate_launch(
            cfg, env=launched_env(["--multi_gpu", "--mixed_precision", "bf16", *TWO], monkeypatch, tmp_path)
        )
    cfg = TrainConfig()
    cfg.distributed.strategy, cfg.distributed.shard = "fsdp", "hybrid"
    same, _ = from_accelerate_launch(cfg, env=launched_env(["--use_fsdp", *TWO], monkeypatch, tmp_path))
    assert same == cfg


def test_a_resumed_run_keeps_what_it_was_trained_with(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="the run being resumed was trained with distributed.strategy: ddp"):
        from_accelerate_launch(
            TrainConfig(), resuming=True, env=launched_env(["--use_fsdp", *TWO], monkeypatch, tmp_path)
        )
    saved = TrainConfig()
    saved.distributed.strategy = "fsdp"
    assert (
        from_accelerate_launch(saved, resuming=True, env=launched_env(["--use_fsdp", *TWO], monkeypatch, tmp_path))[0]
        == saved
    )


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--use_fsdp", "--fsdp_sharding_strategy", "SHARD_GRAD_OP"], "--fsdp_sharding_strategy .* SHARD_GRAD_OP"),
        (["--use_fsdp", "--fsdp_sharding_strategy", "NO_SHARD"], "--fsdp_sharding_strategy .* NO_SHARD"),
        (
            ["--use_fsdp", "--fsdp_reshard_after_forward", "false"],
            "--fsdp_reshard_after_forward reshard_after_forward false",
        ),
        (["--use_deepspeed", "--zero_stage", "1"], "ZeRO stage 1"),
        (["--use_deepspeed", "--zero_stage", "3", "--offload_param_device", "nvme"], "NVMe"),
        (["--use_megatron_lm"], "Megatron-LM"),
    ],
)
def test_what_ayar_cannot_run_is_refused_with_the_flag_named(argv, says, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match=says):
        from_accelerate_launch(TrainConfig(), env=launched_env([*argv, *TWO], monkeypatch, tmp_path))
    # fp8 (accelerate refuses it itself on a machine without Transformer Engine, MS-AMP or torchao, as this one)
    with pytest.raises(ConfigError, match="--mixed_precision fp8"):
        from_accelerate_launch(TrainConfig(), env={"ACCELERATE_MIXED_PRECISION": "fp8"})


def test_a_deepspeed_config_file_gives_its_stage_and_offload(monkeypatch, tmp_path):
    """`--deepspeed_config_file`: its ZeRO stage, offload, accumulation and clipping are taken ("auto" leaves the
    config's); what ayar writes itself from the run's config is named as not used."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "overlap_comm": True},
        "gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 0.3,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    }))  # fmt: skip
    env = launched_env(["--use_deepspeed", "--deepspeed_config_file", str(ds), *TWO], monkeypatch, tmp_path)
    cfg, notes = from_accelerate_launch(TrainConfig(), env=env)
    d = cfg.distributed
    assert (d.strategy, d.zero_stage, d.offload, cfg.training.grad_accum, cfg.training.max_grad_norm) == (
        "deepspeed", 3, True, 1, 0.3)  # fmt: skip
    assert f"not used from {ds}: optimizer, zero_optimization.overlap_comm" in notes[1]
    ds.write_text("{not json")
    env = launched_env(["--use_deepspeed", "--deepspeed_config_file", str(ds), *TWO], monkeypatch, tmp_path)
    with pytest.raises(ConfigError, match=f"--deepspeed_config_file {ds}: not valid JSON"):
        from_accelerate_launch(TrainConfig(), env=env)


def test_a_process_no_launcher_started_is_left_as_it_is():
    cfg, notes = from_accelerate_launch(TrainConfig(), env={"PATH": "/bin"})
    assert (cfg, notes) == (TrainConfig(), [])


def test_nproc_auto_is_one_process_per_gpu(monkeypatch):
    from ayar.training.launch import processes

    for gpus, expected in ((4, 4), (0, 1)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda n=gpus: n)
        assert processes("auto") == expected
    assert processes("3") == processes(3) == 3
    for bad in ("0", "two", -1, True):
        with pytest.raises(ConfigError, match="give a number of processes"):
            processes(bad)


def test_machines_that_do_not_meet_end_with_a_message_not_a_traceback(tiny_model_dir, tmp_path):
    """`--nnodes 2` where the other machine never comes: after `--rdzv-timeout` seconds (torchrun's join_timeout;
    before, 600 s of silence then torchrun's RendezvousTimeoutError traceback) one line says what to run where."""
    import subprocess
    import sys

    from ayar.netutil import free_port
    from ayar.training.launch import torchrun_command

    cmd = torchrun_command(["c.yaml"], 1, 2, 0, "head:29500", rdzv_timeout=30)
    assert cmd[cmd.index("--rdzv-conf") + 1] == "join_timeout=30"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "AYAR_HOME": str(tmp_path / "home")}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(
        [sys.executable, "-m", "ayar", "train", f"model.name={tiny_model_dir}", "data.train=sample:gsm8k",
         "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-timeout", "3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "launch waiting for 2 machines at 127.0.0.1:" in done.stderr and "up to 3 s" in done.stderr
    assert "error: the 2 machines did not meet at 127.0.0.1:" in done.stderr
