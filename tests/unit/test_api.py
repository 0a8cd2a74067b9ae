"""The Python API (ayar/api.py) on a tiny model: the same functions the CLI runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ayar
from ayar.errors import ConfigError, DataError
from tests.helpers import MATH_ROWS, write_jsonl


def test_import_ayar_stays_light():
    code = "import ayar, sys; ayar.Run; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_config_from_path_dict_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora: {r: 4}\n")
    assert ayar.configure(f, lora__alpha=8).lora.alpha == 8
    assert ayar.configure({"lora": {"r": 4}}, **{"training.max_steps": 3}).training.max_steps == 3
    assert ayar.configure(ayar.configure(None, lora__r=2)).lora.r == 2
    with pytest.raises(ConfigError, match="did you mean 'r'"):
        ayar.configure(None, lora__rank=4)


def test_train_plan_chat_evaluate_export_load(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 2)
    source = {
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "data": {"train": str(data), "val_ratio": 0.25, "lint": "warn"},
        "output": {"dir": str(tmp_path / "runs")},
    }
    overrides = {"training.max_steps": 3, "training.tracker": "none", "training.batch_size": 4}
    assert ayar.plan(source, **overrides).fits
    run = ayar.train(source, **overrides)
    assert run.meta["status"] == "completed" and run.meta["steps"] == 3 and run.metrics
    assert isinstance(run.chat("What is 12 plus 30?", max_new_tokens=4), str)
    report = ayar.evaluate(run, max_rows=3, max_new_tokens=4, anchor=None)
    assert "tuned" in report.models and "base" in report.models
    exported = ayar.export(run, max_new_tokens=4, log=lambda *_: None)
    assert exported.ok and exported.gate.ok
    assert isinstance(ayar.load(exported.folder).generate("hi", max_new_tokens=2).text, str)
    again = ayar.train(resume=run.path)
    assert again.path == run.path
    with pytest.raises(ConfigError, match="resume continues"):
        ayar.train(source, resume=run.path)


@pytest.mark.distributed
def test_training_in_several_processes_fails_with_the_workers_error(tiny_model_dir, tmp_path, capfd):
    """`ayar.train(cfg, nproc=2)` runs torchrun here (the web UI's Processes field calls it; a run that trains is in
    tests/unit/ui/test_train_form.py): a run the processes refuse raises one error, after theirs."""
    from ayar.errors import AyarError

    source = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(tmp_path / "missing.jsonl")}}
    with pytest.raises(AyarError, match="training in 2 processes failed"):
        ayar.train(source, nproc=2, **{"output.dir": str(tmp_path / "runs")})
    assert "missing.jsonl" in capfd.readouterr().err  # the workers' own message, said before ours
    with pytest.raises(AyarError, match="output.path .* exists and is not an empty folder"):
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "x").write_text("mine")
        ayar.train(source, nproc=2, **{"output.path": str(tmp_path / "taken")})
    assert (tmp_path / "taken" / "x").read_text() == "mine"


def test_data_functions_lint_preview_clean_convert(tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "d.jsonl", [*MATH_ROWS, {"instruction": "Say hi", "output": ""}, MATH_ROWS[0]])
    report = ayar.lint(bad, model=str(tiny_model_dir))
    n = len(MATH_ROWS)
    text = report.format()
    assert len(report.errors) == 1 and f"d.jsonl:{n + 1}" in text and "empty" in text, text
    assert len(report.warnings) == 1 and f"d.jsonl:{n + 2}: same as {bad}:1" in text, text

    html = tmp_path / "p.html"
    examples = ayar.preview(bad, n=2, model=str(tiny_model_dir), html=html)
    assert [e.where for e in examples] == [f"{bad}:1", f"{bad}:2"] and html.is_file()
    assert all(0 < e.n_trained < len(e.input_ids) for e in examples)

    cleaned = ayar.clean(bad, out=tmp_path / "clean.jsonl", near_dup=False)
    assert cleaned.format == "alpaca" and len(cleaned.path.read_text().splitlines()) == len(MATH_ROWS)
    assert cleaned.report.output_rows == len(MATH_ROWS) and cleaned.report_path.is_file()
    with pytest.raises(DataError, match="exists: pass --force"):
        ayar.clean(bad, out=cleaned.path)
    path = ayar.convert(cleaned.path, to="messages", out=tmp_path / "m.jsonl")
    assert ayar.lint(path, model=str(tiny_model_dir)).errors == []
    before = bad.read_bytes()
    with pytest.raises(DataError, match="is an input file"):
        ayar.convert(bad, to="messages", out=bad, force=True)
    assert bad.read_bytes() == before
