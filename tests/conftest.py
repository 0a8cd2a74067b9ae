"""Fixtures shared by the test suite; the helpers they build on are in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import MATH_ROWS, make_model, run_config, save_tiny, tiny_train_config, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-style model directory (ChatML template)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A run directory: 6 LoRA steps of the tiny Qwen2-style model on MATH_ROWS."""
    from ayar.training.sft import train_sft

    tmp = tmp_path_factory.mktemp("tinyrun")
    data = write_jsonl(tmp / "d.jsonl", MATH_ROWS * 2)
    cfg = tiny_train_config(tiny_model_dir, data, tmp / "runs", max_steps=6, eval_steps=2)
    cfg.data.lint = "warn"  # MATH_ROWS * 2 repeats rows on purpose
    cfg.data.cache = False  # session fixtures run before the per-test AYAR_HOME is set
    return train_sft(cfg).path


@pytest.fixture(scope="session")
def gguf_run(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer (from the bundled GGUF): llama.cpp's converter
    recognizes known tokenizers only, so the random ones of the other tests would not convert."""
    import transformers as tf

    from ayar.models.default import find_default_gguf
    from ayar.training.sft import train_sft

    gguf = find_default_gguf()
    tmp = tmp_path_factory.mktemp("ggufrun")
    tok = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = make_model("llama", tok, hidden_size=64, intermediate_size=128, tie_word_embeddings=True)
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    data = write_jsonl(tmp / "d.jsonl", MATH_ROWS)
    cfg = run_config(
        tmp / "model", data, tmp / "runs", "training.max_steps=2", "data.val_ratio=0.2", "data.cache=false"
    )
    return train_sft(cfg).path


@pytest.fixture(scope="session")
def gguf_lora_runs(gguf_run, tmp_path_factory):
    """Two more runs on gguf_run's base, trained hard on different answers (so each adapter changes what the model
    says), each with a gated GGUF LoRA export (f16 base) and a merged f16 GGUF export."""
    pytest.importorskip("llama_cpp")
    import json

    from ayar.exports.workflow import export_run
    from ayar.training.sft import train_sft

    base = json.loads((gguf_run / "run.json").read_text())["base_model"]
    tmp, runs = tmp_path_factory.mktemp("ggufloras"), {}
    for name, answer in (("upper", "YES YES YES. The answer is 42."), ("lower", "no, never; it is 7 and only 7.")):
        rows = [{**r, "output": answer} for r in MATH_ROWS]
        data = write_jsonl(tmp / f"{name}.jsonl", rows)
        cfg = run_config(base, data, tmp / "runs", f"output.name={name}", "training.max_steps=8",
                         "training.learning_rate=0.02", "data.val_ratio=0", "data.cache=false")  # fmt: skip
        run = train_sft(cfg).path
        quiet = {"log": lambda *_: None, "max_new_tokens": 8}
        assert export_run(run, "gguf", "lora-f16", **quiet).ok
        export_run(run, "gguf", "f16", verify=False, **quiet)
        runs[name] = run
    return runs


@pytest.fixture(scope="session")
def gguf_engine(gguf_run, tmp_path_factory):
    """A llama.cpp engine on an f16 GGUF export of gguf_run (llama-cpp-python needed)."""
    pytest.importorskip("llama_cpp")
    from ayar.exports.gguf import export_gguf
    from ayar.infer.gguf_engine import GgufEngine

    out = export_gguf(gguf_run, tmp_path_factory.mktemp("gguf") / "g", "f16", log=lambda *_: None)
    return GgufEngine(out)


@pytest.fixture(autouse=True)
def _ayar_home(tmp_path_factory, monkeypatch):
    # Tests never write to the user's cache, except the slow tier, which sets its own.
    if "AYAR_TEST_HOME" not in os.environ:
        monkeypatch.setenv("AYAR_HOME", str(tmp_path_factory.getbasetemp() / "ayar-home"))


def pytest_sessionfinish(session):
    """Under pytest-xdist (`make test` runs two workers) each worker hands its reliability figures to the controller,
    which prints them (below)."""
    from tests.reliability import COUNTS, FIGURES

    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["reliability"] = {"counts": dict(COUNTS), "figures": FIGURES}


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without xdist, none to implement
def pytest_testnodedown(node, error):
    """The controller adds up what each worker counted (pytest-xdist's hook, called there only)."""
    from tests.reliability import COUNTS, FIGURES

    got = getattr(node, "workeroutput", {}).get("reliability", {})
    COUNTS.update(got.get("counts", {}))
    FIGURES.extend(tuple(f) for f in got.get("figures", []))


def pytest_terminal_summary(terminalreporter):
    """The reliability figures of this run (tests/reliability/__init__.py)."""
    import json

    from tests.reliability import COUNTS, FIGURES

    if hasattr(terminalreporter.config, "workeroutput") or (not COUNTS and not FIGURES):
        return
    terminalreporter.section("reliability figures")
    for what, n in sorted(COUNTS.items()):
        terminalreporter.write_line(f"{what}: {n:,}")
    for what, figure in FIGURES:
        terminalreporter.write_line(f"{what}: {figure}")
    if os.environ.get("AYAR_RELIABILITY_REPORT"):
        Path(os.environ["AYAR_RELIABILITY_REPORT"]).write_text(
            json.dumps({"counts": dict(COUNTS), "figures": dict(FIGURES)}, indent=1) + "\n"
        )
