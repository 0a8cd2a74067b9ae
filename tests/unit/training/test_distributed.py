"""Data-parallel training on torch.distributed (gloo, 2 processes on this machine, started by torchrun through
`ayar train --nproc 2`): the same losses and the same adapter as one process with the same global batch; only
rank 0 writes the run directory."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ayar.netutil import free_port
from tests.helpers import MATH_ROWS, write_jsonl


def _train(args, cwd, env_extra=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "AYAR_HOME": str(cwd / "home"), **(env_extra or {})}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "-m", "ayar", "train", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_a_finished_worker_ends_without_the_interpreters_teardown():
    """A training process that torchrun started ends at once when its run is complete (cli/train.py `_done`): its
    output flushed, exit code 0, no atexit handler run (the teardown where a gloo thread now and then aborted a
    finished run, training/launch.py `end_worker`); a plain process returns as usual."""
    code = (
        "import atexit, sys; atexit.register(lambda: print('teardown ran'));"
        "from ayar.cli.train import _done; print('saved', end=''); sys.exit(_done())"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    worker = subprocess.run(
        [sys.executable, "-c", code], env={**env, "WORLD_SIZE": "2"}, capture_output=True, text=True
    )
    assert (worker.returncode, worker.stdout) == (0, "saved")
    env.pop("WORLD_SIZE", None)
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert (plain.returncode, plain.stdout) == (0, "savedteardown ran\n")


COMMON = [
    "model.dtype=float32",
    "data.val_ratio=0",
    "data.lint=warn",
    "training.max_steps=10",
    "training.warmup_ratio=0",
    # at 0.02 the loss bounces after step 5 and the float-order difference of step 1 (~4e-8) grows 5x a step past
    # 1e-5 by step 6 on an AVX2 CPU (its kernels round differently from AVX512's): 0.01 trains as far in 10 steps
    "training.learning_rate=0.01",
    "training.tracker=none",
    "training.threads=1",
    "lora.dropout=0",  # dropout masks depend on how rows are grouped into passes
]


def as_if_killed(run, *steps: int) -> None:
    """The run as a kill after an earlier checkpoint leaves it: checkpoints `steps` and the final adapter gone,
    run.json still `running`."""
    import shutil

    for step in steps:
        shutil.rmtree(run / "checkpoints" / f"checkpoint-{step:07d}")
    shutil.rmtree(run / "adapter")
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "status": "running"}))


def losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_training(a, b, tol=1e-5, split=False):
    """Per-step losses equal to `tol` relative (float32 sums taken in another order drift by a few 1e-6 over
    10 steps at this high learning rate), and the adapters equal. `split`: gradients reduce-scattered (FSDP, ZeRO) in
    another order than one process sums them drift more (the grad norm by up to 1e-4 relative after a few steps);
    AdamW moves a weight whose gradient is ~0 by up to its learning rate whatever that gradient's rounding, so an odd
    element may differ by a few 1e-4: each within 1e-3, and on average within 5e-6."""
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 10 and la[-1] < la[0]
    assert max(abs(x - y) / abs(x) for x, y in zip(la, lb)) < tol, (la, lb)
    assert_same_adapters(a, b, split)


def assert_same_adapters(a, b, split=False):
    """The runs' adapters equal (`split`: see assert_same_training)."""
    wa = load_file(a / "adapter" / "adapter_model.safetensors")
    wb = load_file(b / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-3 if split else 1e-4, rtol=0 if split else 1e-3)
    if split:
        assert sum(float((wa[k] - wb[k]).abs().sum()) for k in wa) / sum(v.numel() for v in wa.values()) < 5e-6


def _one_and_two(tiny_model_dir, tmp_path, **two: list[str]) -> None:
    """10 steps of one process (batch 8) and of each of `two` (2 processes, the same global batch): the same
    per-step losses (to 1e-5, relative) and the same adapter."""
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 4)
    common = [f"model.name={tiny_model_dir}", f"data.train={data}", *COMMON]
    for name, extra in {"one": ["training.batch_size=8"], **two}.items():
        done = _train([*common, f"output.path={tmp_path / name}", *extra], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        if "--nproc" in extra:
            assert "torch.distributed.run" in done.stderr and "world  2 processes (gloo, data parallel)" in done.stderr
    for name in two:
        assert_same_training(tmp_path / "one", tmp_path / name)


def test_two_processes_train_what_one_does_with_the_same_global_batch(tiny_model_dir, tmp_path):
    """batch 4 x 2 processes against 8 x 1: the same losses and adapter; rank 0 alone writes."""
    _one_and_two(tiny_model_dir, tmp_path, two=["training.batch_size=4", "--nproc", "2"])
    meta = json.loads((tmp_path / "two" / "run.json").read_text())
    assert meta["status"] == "completed" and meta["plan"]["world_size"] == 2
    assert len(meta["peak_rss_mb_per_rank"]) == 2 and min(meta["peak_rss_mb_per_rank"]) > 0
    training = meta["training_peak_rss_mb_per_rank"]  # training's own, which the memory plan per process predicts
    assert min(training) > 0 and all(t <= p for t, p in zip(training, meta["peak_rss_mb_per_rank"]))
    # rank 0 alone writes: one metrics line per step and evaluation, as one process writes
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == len(
        (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    )


@pytest.mark.distributed
def test_accumulation_in_two_processes_trains_what_one_process_does(tiny_model_dir, tmp_path):
    """2 rows x 2 processes x 2 accumulation steps against 8 x 1."""
    _one_and_two(tiny_model_dir, tmp_path, accum=["training.batch_size=2", "training.grad_accum=2", "--nproc", "2"])


@pytest.mark.distributed
def test_rows_that_do_not_fill_the_last_global_batch(tiny_model_dir, tmp_path):
    """43 rows in global micro-batches of 8: each epoch's last one has 3, so one process gets 3 rows (2 passes of 2)
    and the other none. Data parallel: that process adds nothing; FSDP, whose passes are collective: it runs 2
    stand-in passes that train nothing. Both train what one process trains on the same rows (it crashed before)."""
    data = write_jsonl(tmp_path / "d.jsonl", (MATH_ROWS * 4)[:43])
    common = [f"model.name={tiny_model_dir}", f"data.train={data}", *COMMON, "training.rows_per_pass=2"]
    runs = {
        "one": ["training.batch_size=8"],
        "ddp": ["training.batch_size=4", "--nproc", "2"],
        "fsdp": ["training.batch_size=4", "distributed.strategy=fsdp", "--nproc", "2"],
    }
    for name, extra in runs.items():
        done = _train([*common, f"output.path={tmp_path / name}", *extra], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    # the all-reduce sums the gradients in another order than one process does, and AdamW then moves an odd element
    # whose gradient is ~0 apart as under the split strategies (seen on an AVX512-BF16 CPU: one element by 1.4e-4)
    assert_same_training(tmp_path / "one", tmp_path / "ddp", split=True)
    assert_same_training(tmp_path / "one", tmp_path / "fsdp", split=True)


def test_the_launch_command_is_torchruns():
    from argparse import Namespace

    from ayar.cli.train import launch_command

    args = Namespace(nproc=8, nnodes=4, node_rank=1, rdzv_endpoint="head:29500", rdzv_timeout=30)
    cmd = launch_command(args, ["cfg.yaml", "--nproc", "8", "--nnodes=4", "--node-rank", "1", "lora.r=8",
                                "--rdzv-endpoint", "head:29500", "--rdzv-timeout", "30"])  # fmt: skip
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node"] and "--standalone" not in cmd
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "head:29500" and cmd[cmd.index("--node-rank") + 1] == "1"
    assert cmd[cmd.index("--rdzv-conf") + 1] == "join_timeout=30"
    assert cmd[-5:] == ["-m", "ayar", "train", "cfg.yaml", "lora.r=8"]
    import pytest

    from ayar.errors import ConfigError

    with pytest.raises(ConfigError, match="needs --rdzv-endpoint"):
        launch_command(Namespace(nproc=2, nnodes=2, node_rank=0, rdzv_endpoint=None, rdzv_timeout=None), [])


def stage_inputs(stage: str, tmp_path) -> list[str]:
    """The data and stage overrides of a small run of a Trainer stage (dpo, reward, grpo, classification)."""
    from tests.unit.training.test_stages import DIGITS, LABELLED, PAIRS

    if stage == "grpo":
        (tmp_path / "rewards.py").write_text(DIGITS)
        data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
        extra = ["stage=grpo", f"grpo.rewards=[{tmp_path / 'rewards.py'}:digits]", "grpo.max_completion_length=8",
                 "grpo.num_generations=4", "training.batch_size=4"]  # fmt: skip
    elif stage == "classification":
        data = write_jsonl(tmp_path / "c.jsonl", LABELLED)
        extra = ["task=classification", "data.format=classification", "training.batch_size=2"]
    else:
        data = write_jsonl(tmp_path / "p.jsonl", PAIRS[:8])
        extra = [f"stage={stage}", "training.batch_size=2"]
    return [f"data.train={data}", *extra]


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["dpo", "reward", "grpo", "classification"])
def test_a_trl_stage_runs_under_the_same_launcher(tiny_model_dir, tmp_path, stage):
    """DPO, reward models, GRPO and classification on transformers' Trainer in 2 processes (it wraps the model in
    DDP itself): one run directory, written by rank 0 alone, with its adapter."""
    args = [
        f"model.name={tiny_model_dir}",
        "model.dtype=float32",
        *stage_inputs(stage, tmp_path),
        "data.val_ratio=0.25",
        "training.max_steps=2",
        "training.tracker=none",
        f"output.path={tmp_path / stage}",
        "--nproc",
        "2",
    ]
    done = _train(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("done   2 steps") == 1  # rank 1 prints nothing
    steps = [json.loads(line)["step"] for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(1) <= 1  # one writer: no line twice
    assert (tmp_path / stage / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / stage / "run.json").read_text())["status"] == "completed"


def _accelerate_launch(flags: list[str], ayar_args: list[str], cwd):
    """`accelerate launch FLAGS --num_processes 2 -m ayar train AYAR_ARGS`, accelerate's own config file (if this
    machine has one) left out."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "AYAR_HOME": str(cwd / "home"),
           "HF_HOME": str(cwd / "hf")}  # fmt: skip
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", str(free_port())]  # fmt: skip
    return subprocess.run(
        [*launch, "-m", "ayar", "train", *ayar_args], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_accelerate_launch_runs_ayar_train_as_users_type_it(tiny_model_dir, tmp_path, stage):
    """`accelerate launch --multi_gpu --num_processes 2 -m ayar train ...` (accelerate's torchrun path; on a
    machine without GPUs its processes meet on gloo): ayar's own loop trains what `--nproc 2` trains, to the
    last digit, and a Trainer stage runs in the same 2 processes."""
    from tests.unit.training.test_stages import PAIRS

    rows = MATH_ROWS * 2 if stage == "sft" else PAIRS[:8]
    common = [f"model.name={tiny_model_dir}", f"data.train={write_jsonl(tmp_path / 'd.jsonl', rows)}", *COMMON,
              f"stage={stage}", "training.max_steps=3", "training.batch_size=2"]  # fmt: skip
    done = _accelerate_launch(["--multi_gpu"], [*common, f"output.path={tmp_path / 'acc'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((tmp_path / "acc" / "run.json").read_text())
    assert meta["status"] == "completed" and meta["plan"]["world_size"] == 2
    assert (tmp_path / "acc" / "adapter" / "adapter_model.safetensors").is_file()
    if stage == "sft":
        ours = _train([*common, f"output.path={tmp_path / 'nproc'}", "--nproc", "2"], tmp_path)
        assert ours.returncode == 0, ours.stderr[-3000:]
        assert losses(tmp_path / "acc") == losses(tmp_path / "nproc") and len(losses(tmp_path / "acc")) == 3


@pytest.mark.distributed
@pytest.mark.parametrize(
    "stage, flags, ours",
    [
        ("sft", ["--use_fsdp"], ["distributed.strategy=fsdp"]),
        (
            "sft",
            ["--use_deepspeed", "--zero_stage", "3"],
            ["distributed.strategy=deepspeed", "distributed.zero_stage=3"],
        ),
        ("dpo", ["--use_fsdp"], ["distributed.strategy=fsdp"]),
    ],
)
def test_accelerate_launchs_strategy_flags_run_that_strategy(tiny_model_dir, tmp_path, stage, flags, ours):
    """`accelerate launch --use_fsdp` / `--use_deepspeed --zero_stage 3` run ayar's FSDP / ZeRO-3, as
    `distributed.strategy` would (before, ayar's own loop ran data parallel without a word, and a Trainer stage under
    --use_fsdp on a CPU stopped with accelerate's traceback): the same losses as `--nproc 2` with the config's
    section, the strategy recorded in the run's config.yaml and run.json."""
    from tests.unit.training.test_stages import PAIRS

    rows = MATH_ROWS * 2 if stage == "sft" else PAIRS[:8]
    common = [f"model.name={tiny_model_dir}", f"data.train={write_jsonl(tmp_path / 'd.jsonl', rows)}", *COMMON,
              f"stage={stage}", "training.max_steps=3", "training.batch_size=2"]  # fmt: skip
    done = _accelerate_launch(flags, [*common, f"output.path={tmp_path / 'acc'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("launch from accelerate launch: distributed.strategy") == 1  # said once, by rank 0
    meta = json.loads((tmp_path / "acc" / "run.json").read_text())
    strategy = ours[0].split("=")[1]
    assert (
        meta["plan"]["strategy"] == strategy
        and f"strategy: {strategy}" in (tmp_path / "acc" / "config.yaml").read_text()
    )
    ours_run = _train([*common, *ours, f"output.path={tmp_path / 'nproc'}", "--nproc", "2"], tmp_path)
    assert ours_run.returncode == 0, ours_run.stderr[-3000:]
    assert losses(tmp_path / "acc") == losses(tmp_path / "nproc") and len(losses(tmp_path / "acc")) == 3


@pytest.mark.distributed
def test_deepspeeds_launcher_runs_ayar_train(tiny_model_dir, tmp_path):
    """`deepspeed --num_gpus 2 --module ayar train ...` (DeepSpeed's own launcher; on a CPU its processes meet on
    gloo): it puts `--local_rank=N` before the command (ayar said "unknown command '--local_rank=0'"); the same
    losses as `--nproc 2`."""
    common = [f"model.name={tiny_model_dir}", f"data.train={write_jsonl(tmp_path / 'd.jsonl', MATH_ROWS * 2)}",
              *COMMON, "training.max_steps=3", "training.batch_size=2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "AYAR_HOME": str(tmp_path / "home")}
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
    done = subprocess.run([*launch, "--module", "ayar", "train", *common, f"output.path={tmp_path / 'ds'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    ours = _train([*common, f"output.path={tmp_path / 'nproc'}", "--nproc", "2"], tmp_path)
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert losses(tmp_path / "ds") == losses(tmp_path / "nproc") and len(losses(tmp_path / "ds")) == 3


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["ayar", "accelerate"])
def test_two_machines_meet_at_a_rendezvous_endpoint(tiny_model_dir, tmp_path, launcher):
    """Two "machines" (two commands on 127.0.0.1, one process each) meeting at one endpoint: `ayar train --nnodes 2
    --node-rank R --rdzv-endpoint HOST:PORT`, or `accelerate launch --num_machines 2 --machine_rank R
    --main_process_ip HOST --main_process_port PORT -m ayar train`: they train as one run of world size 2, with the
    losses of 2 local processes."""
    port = free_port()
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "AYAR_HOME": str(tmp_path / "home"),
           "HF_HOME": str(tmp_path / "hf")}  # fmt: skip
    env.pop("WORLD_SIZE", None)
    common = [f"model.name={tiny_model_dir}", "model.dtype=float32", f"data.train={data}", "data.val_ratio=0",
              "data.lint=warn", "training.max_steps=2", "training.batch_size=2", "training.tracker=none",
              "training.threads=1"]  # fmt: skip

    def machine(rank: int) -> list[str]:
        out = f"output.path={tmp_path / f'node{rank}'}"
        if launcher == "ayar":
            where = ["--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--node-rank", str(rank)]
            return [sys.executable, "-m", "ayar", "train", *common, out, *where]
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(port), "-m", "ayar", "train", *common, out]  # fmt: skip

    nodes = [
        subprocess.Popen(
            machine(rank), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for rank in (0, 1)
    ]
    errors = [p.communicate(timeout=600)[1] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    # the run is written by global rank 0 alone (each machine was given its own output.path)
    written = [(tmp_path / f"node{r}" / "run.json").is_file() for r in (0, 1)]
    assert sorted(written) == [False, True]
    meta = json.loads((tmp_path / f"node{written.index(True)}" / "run.json").read_text())
    assert meta["plan"]["world_size"] == 2 and meta["status"] == "completed"
    local = _train([*common, f"output.path={tmp_path / 'local'}", "--nproc", "2"], tmp_path)
    assert local.returncode == 0, local.stderr[-2000:]
    a, b = losses(tmp_path / f"node{written.index(True)}"), losses(tmp_path / "local")
    assert len(a) == 2 and max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-5, (a, b)


@pytest.mark.distributed
def test_a_run_of_two_processes_resumes_in_one(tiny_model_dir, tmp_path):
    """DDP resumes with another number of processes: the checkpoint's position in the epoch (in global
    micro-batches of 2 x 2 rows) is continued in micro-batches of 2 rows: no example skipped or repeated."""
    rows = MATH_ROWS * 2
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run = tmp_path / "run"
    args = [
        f"model.name={tiny_model_dir}",
        "model.dtype=float32",
        f"data.train={data}",
        "data.val_ratio=0",
        "data.lint=warn",
        "training.max_steps=2",
        "training.save_steps=1",
        "training.batch_size=2",
        "training.tracker=none",
        f"output.path={run}",
        "--nproc",
        "2",
    ]
    assert _train(args, tmp_path).returncode == 0
    # as if killed after step 1: its checkpoint is the latest, the run unfinished
    as_if_killed(run, 2)
    resumed = _train(["--resume", str(run)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert [r["step"] for r in records] == [1, 2]
    # step 1 took rows 0-3 of the epoch's order (2 processes x 2); step 2 takes rows 4-5: 6 rows into the epoch
    assert abs(records[1]["epoch"] - 6 / len(rows)) < 1e-4, records
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_a_position_another_world_cannot_continue_exactly_is_a_clear_error():
    import pytest

    from ayar.errors import AyarError
    from ayar.training.loop import LoopState, continue_with

    state = continue_with(LoopState(micro=4, world_size=2), 2, 4)  # 16 rows done: 2 global micro-batches of 8
    assert (state.micro, state.world_size) == (2, 4)
    assert continue_with(LoopState(micro=3, world_size=1), 2, 1).micro == 3  # the same world: unchanged
    with pytest.raises(AyarError, match="6 examples into epoch 0, which 2 processes of 2 rows .* cannot continue"):
        continue_with(LoopState(micro=3, world_size=1), 2, 2)


@pytest.mark.distributed
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_one(tiny_model_dir, tmp_path):
    """SIGKILL to the whole process group (torchrun and both workers) part-way, then `--resume --nproc 2`: the
    same per-step losses and adapter as the run that was never interrupted (dropout on: each rank resumes its
    own random stream)."""
    import signal
    import time

    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 3)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "AYAR_HOME": str(tmp_path / "home")}
    env.pop("WORLD_SIZE", None)

    def start(out):
        args = [f"model.name={tiny_model_dir}", f"data.train={data}", "model.dtype=float32", "data.val_ratio=0",
                "data.lint=warn", "data.cache=false", "training.max_steps=12", "training.save_steps=1",
                "training.batch_size=2", "training.warmup_ratio=0", "training.tracker=none", "training.threads=1",
                f"output.path={out}", "--nproc", "2"]  # fmt: skip
        cmd = [sys.executable, "-m", "ayar", "train", *args]
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True, **quiet)

    ref = start(tmp_path / "ref")
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-2000:]
    run = tmp_path / "killed"
    proc = start(run)
    for _ in range(6000):  # bounded: 2 minutes; kill once step 3's checkpoint is complete
        done = [p for p in (run / "checkpoints").glob("checkpoint-*") if (p / "state.json").is_file()]
        if max((int(p.name.split("-")[1]) for p in done), default=0) >= 3 or proc.poll() is not None:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((run / "run.json").read_text())["status"] == "running"  # killed part-way
    resumed = _train(["--resume", str(run), "--nproc", "2"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run) == losses(tmp_path / "ref")
    wa = load_file(run / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _gradients(rank: int) -> list:
    """Rank r's gradients: a big one, small ones (a bucket of several), a fp16 one, and one never computed."""
    shapes = [(300,), (7, 3), (5,), (4, 4), (9,)]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float16 if i == 3 else None)) for i, s in enumerate(shapes)]
    for i, p in enumerate(params[:-1]):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * rank + i)).to(p.dtype)
    return params


def _sum(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from ayar.training.distributed import World, sum_gradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    params = _gradients(rank)
    big = params[0].grad
    sum_gradients(World(2, rank), params, bucket_bytes=256)  # the 300-float gradient is larger than a bucket
    torch.save({"grads": [p.grad for p in params], "in_place": params[0].grad is big}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_gradients_are_summed_across_ranks_in_buckets(tmp_path):
    """Each gradient is the sum of both ranks' (a missing one counts as zeros), in its own dtype; a gradient
    larger than a bucket is summed in place."""
    torch.multiprocessing.spawn(_sum, args=(free_port(), str(tmp_path)), nprocs=2)
    expected = [
        a.grad + b.grad if a.grad is not None else torch.zeros_like(a) for a, b in zip(_gradients(0), _gradients(1))
    ]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["in_place"]
        for g, e in zip(got["grads"], expected, strict=True):
            assert g.dtype == e.dtype and g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=1e-3 if e.dtype == torch.float16 else 1e-6, atol=1e-6)


def _waits_for_rank0(rank: int, port: int, out: str) -> None:
    """One of 2 processes whose default group serves CUDA tensors alone, as NCCL's does (here gloo for "cuda" only),
    with a collective timeout of 2 seconds: ayar's groups (`start`), then rank 0 working alone for 4 seconds twice
    (tokenizing first; writing the final model before the end), as on a large model or dataset."""
    import time
    from datetime import timedelta
    from types import SimpleNamespace

    import torch.distributed as dist

    from ayar.training import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))  # fmt: skip
    dist.init_process_group("cuda:gloo", timeout=timedelta(seconds=2))
    plan = SimpleNamespace(world_size=2, rank=rank, device="cpu", distributed=SimpleNamespace(timeout=2))
    world = distributed.start(plan)
    with distributed.main_first(world):
        if world.main:
            time.sleep(4)
    said = [distributed.share(world, "rank 0's" if world.main else None), distributed.total(world, rank + 1.0)]
    said.append(distributed.gather(world, rank))
    if world.main:
        time.sleep(4)
    distributed.stop(world)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(said, f)


def test_the_processes_wait_for_rank_0_beyond_the_collective_timeout(tmp_path):
    """Where rank 0 works alone (converting the model, tokenizing into the cache, writing checkpoints and the final
    model) the others wait beyond `distributed.timeout` (NCCL's default is 10 minutes: a large dataset's
    tokenizing took a run down there), and the CPU-side collectives of training (loss counts, shared objects) run
    on a gloo group where the default group takes CUDA tensors alone (under NCCL `total` could not sum a CPU
    tensor: torch maps nccl to CUDA alone). Before: over a gloo default group rank 1 timed out in the first wait; over
    this one the first shared object went to CUDA ("Torch not compiled with CUDA enabled")."""
    torch.multiprocessing.spawn(_waits_for_rank0, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == ["rank 0's", 3.0, [0, 1]]


def test_the_process_group_takes_the_configured_timeout(monkeypatch):
    """`distributed.timeout` (transformers' ddp_timeout) is the default group's and the CPU group's; rank 0's lone
    work is waited for up to RANK0_WAIT; nccl on CUDA with each process on its own GPU, gloo on CPU."""
    from datetime import timedelta
    from types import SimpleNamespace

    import torch.distributed as dist

    from ayar.training import distributed

    made = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: made.append(("default", kw)))
    monkeypatch.setattr(dist, "new_group", lambda **kw: made.append(("group", kw)) or f"gloo, {kw['timeout']}")
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: made.append(("device", i)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    hours2 = timedelta(hours=2)
    for device in ("cpu", "cuda"):
        made.clear()
        world = distributed.start(SimpleNamespace(world_size=2, rank=1, device=device,
                                                  distributed=SimpleNamespace(timeout=7200)))  # fmt: skip
        assert made == [("device", 1)] * (device == "cuda") + [
            ("default", {"backend": "nccl" if device == "cuda" else "gloo", "timeout": hours2}),
            ("group", {"backend": "gloo", "timeout": hours2}),
            ("group", {"backend": "gloo", "timeout": distributed.RANK0_WAIT}),
        ]
        assert (world.cpu, world.patient) == (f"gloo, {hours2}", f"gloo, {distributed.RANK0_WAIT}")
    made.clear()  # a launcher that shows each process its own GPU (Slurm's --gpus-per-task 1): that one
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    distributed.start(SimpleNamespace(world_size=2, rank=1, device="cuda", distributed=SimpleNamespace(timeout=7200)))
    assert made[0] == ("device", 0)


def _train_rank(rank: int, port: int, model_dir: str, data: str, out: str, perturb: bool) -> None:
    """Rank `rank` of a 2-process `train_sft` (the environment torchrun gives); with `perturb`, rank 1 draws a
    random number just before the adapter is initialized, as a rank that converted the default model did."""
    from pathlib import Path

    from ayar.training import sft
    from tests.helpers import tiny_train_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank), AYAR_HOME=f"{out}/home{rank}")  # fmt: skip
    apply = sft.apply_method

    def drawn_first(*args, **kwargs):
        if perturb and rank == 1:
            torch.rand(1)
        return apply(*args, **kwargs)

    sft.apply_method = drawn_first
    cfg = tiny_train_config(Path(model_dir), Path(data), Path(out), max_steps=3, threads=1, tracker="none")
    cfg.data.val_ratio, cfg.data.lint, cfg.data.cache = 0, "warn", False
    cfg.model.dtype, cfg.lora.dropout, cfg.output.path = "float32", 0.0, f"{out}/run"
    sft.train_sft(cfg)


@pytest.mark.distributed
def test_the_replicas_start_from_rank_0s_adapter(tiny_model_dir, tmp_path):
    """A rank whose random numbers went another way before the adapter's initialization still trains rank 0's
    adapter (it is broadcast, as DDP's wrapper does): the same run as when no rank drew differently."""
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 2)
    for name, perturb in (("same", False), ("drawn", True)):
        (tmp_path / name).mkdir()
        args = (free_port(), str(tiny_model_dir), str(data), str(tmp_path / name), perturb)
        torch.multiprocessing.spawn(_train_rank, args=args, nprocs=2)
    assert losses(tmp_path / "same" / "run") == losses(tmp_path / "drawn" / "run")
    wa = load_file(tmp_path / "same" / "run" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "drawn" / "run" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
