"""The CLI: fast help with no torch import, lazy commands, clear errors instead of tracebacks."""

import os
import subprocess
import sys

import pytest

from ayar.cli import COMMANDS, main
from tests.helpers import MATH_ROWS, write_jsonl


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ayar", *args], capture_output=True, text=True, env=env, timeout=300)


def test_help_does_not_import_torch():
    code = "import sys; from ayar.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.strip().endswith("False")


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_command_help(cmd):
    r = run_cli(cmd, "--help")
    assert r.returncode == 0 and f"ayar {cmd}" in r.stdout
    code = (
        f"import sys\ntry:\n    from ayar.cli import main; main(['{cmd}', '--help'])\nexcept SystemExit: "
        "pass\nprint('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip().endswith("False")


@pytest.mark.parametrize(
    "cmd, option",
    [("train", ["--nproc", "2"]), ("plan", ["--device", "cuda"]), ("compare", ["--methods", "lora"]),
     ("hpo", ["--trials", "2"]), ("rlaif", ["--max-pairs", "3"])],
)  # fmt: skip
def test_options_may_come_between_the_overrides(cmd, option):
    """`ayar plan cfg.yaml --device cuda training.batch_size=2` as typed: argparse alone ends the overrides at the
    first option and refuses the rest ("unrecognized arguments")."""
    from ayar.cli import parse

    _, args = parse(cmd, ["cfg.yaml", "lora.r=8", *option, "training.batch_size=2"])
    assert args.config == "cfg.yaml" and args.overrides == ["lora.r=8", "training.batch_size=2"]
    assert args.argv == ["cfg.yaml", "lora.r=8", *option, "training.batch_size=2"]


def test_unknown_command_suggests(capsys):
    assert main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_config_error_is_a_message_not_a_traceback(tmp_path):
    r = run_cli("train", "lora.rank=8", "training.max_stpes=3")
    assert r.returncode == 2
    assert "did you mean 'r'" in r.stderr and "did you mean 'max_steps'" in r.stderr
    assert "Traceback" not in r.stderr


def test_print_config_and_reference(tmp_path):
    r = run_cli("train", "data.train=x.jsonl", "lora.r=32", "--print-config")
    assert r.returncode == 0 and "r: 32" in r.stdout and "train: x.jsonl" in r.stdout
    r = run_cli("config", "reference")
    assert r.returncode == 0 and "`lora.r`" in r.stdout


def test_bad_data_is_a_message_naming_the_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{oops}\n')
    r = run_cli(
        "train", f"model.name={tiny_model_dir}", f"data.train={bad}", "training.tracker=none", f"output.dir={tmp_path}"
    )
    assert r.returncode == 2 and f"{bad}:2: invalid JSON" in r.stderr and "Traceback" not in r.stderr


def test_train_then_chat_end_to_end(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    r = run_cli(
        "train",
        f"model.name={tiny_model_dir}",
        "model.dtype=float32",
        f"data.train={data}",
        "training.max_steps=3",
        "training.tracker=none",
        f"output.dir={tmp_path / 'runs'}",
    )
    assert r.returncode == 0, r.stderr
    assert "trainable" in r.stderr and "%" in r.stderr  # parameter counts printed before training
    run_dir = next((tmp_path / "runs").iterdir())
    r = run_cli("chat", str(run_dir), "--prompt", "What is 12 plus 30?", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert "no end-of-turn token within 5 new tokens" in r.stderr or r.stdout.strip()
    # REPL: commands work and EOF exits cleanly.
    p = subprocess.run(
        [sys.executable, "-m", "ayar", "chat", str(run_dir), "--max-new-tokens", "3"],
        input="/system Be brief.\nhello\n/reset\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and "system message set" in p.stderr and "history cleared" in p.stderr


def test_a_launchers_local_rank_before_the_command_is_taken_out(monkeypatch):
    """DeepSpeed's launcher runs `python -m ayar --local_rank=N train ...` (torch's old torch.distributed.launch
    `--local-rank N`): the rank goes to LOCAL_RANK where the launcher has not set it, the command runs as typed."""
    from ayar.cli import _launchers_local_rank

    monkeypatch.setenv("LOCAL_RANK", "")  # recorded as it was, so that what this test sets is undone after it
    monkeypatch.delenv("LOCAL_RANK")
    assert _launchers_local_rank(["--local_rank=1", "train", "c.yaml", "lora.r=8"]) == ["train", "c.yaml", "lora.r=8"]
    assert os.environ["LOCAL_RANK"] == "1"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert _launchers_local_rank(["train", "--local-rank", "0", "c.yaml"]) == ["train", "c.yaml"]
    assert os.environ["LOCAL_RANK"] == "3"  # the launcher's environment wins
