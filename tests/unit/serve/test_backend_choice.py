"""`ayar serve RUN` picks its runtime: the gated GGUF export (built once, then reused), a fallback to transformers
naming the failed gate check, transformers where it is needed; and says why each time."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from ayar.errors import AyarError
from ayar.serve.backend_choice import EXPORTS, choose_backend
from ayar.serve.settings import ServeSettings

pytest.importorskip("llama_cpp")


def test_auto_builds_the_gated_gguf_once_then_reuses_it_and_serves_it(gguf_run, tmp_path, monkeypatch):
    # f16: a random tiny model's near-tied logits fail q8_0's agreement bar (the default kind, for real models)
    monkeypatch.setitem(EXPORTS, "gguf", ("gguf", "f16"))
    run = tmp_path / "run"
    shutil.copytree(gguf_run, run)
    lines = []
    choice = choose_backend(ServeSettings(source=str(run), backend="auto"), lines.append)
    assert choice.backend == "gguf" and choice.source == str(run / "export" / "gguf-f16"), choice.warning
    assert "passed its release gate" in choice.reason and any("building it once" in line for line in lines)
    gate = run / "export" / "gguf-f16" / "gate.json"
    built = gate.stat().st_mtime_ns
    builds = []
    again = choose_backend(ServeSettings(source=str(run), backend="auto"), print, build=lambda *a: builds.append(a))
    assert again.source == choice.source and not builds and gate.stat().st_mtime_ns == built  # cached
    # the server answers through llama.cpp under the run's own name
    from fastapi.testclient import TestClient

    from ayar.serve.app import create_app

    app = create_app(ServeSettings(source=str(run), backend="auto", db=f"sqlite:///{tmp_path / 'u.db'}"))
    with TestClient(app) as c:
        import time

        for _ in range(400):
            if c.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        assert c.get("/ready").json()["backend"] == "llama.cpp"
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["run"]


def fake_export(run, gate_ok: bool):
    def build(run_dir, fmt, kind, log):
        folder = run / "export" / f"{fmt}-{kind}"
        folder.mkdir(parents=True)
        checks = [{"name": "top-1 agreement", "ok": gate_ok, "detail": "mean 0.80; needs >= 0.95 for q8_0"}]
        (folder / "gate.json").write_text(json.dumps({"ok": gate_ok, "checks": checks}))

    return build


def test_a_failed_gate_falls_back_to_transformers_naming_the_check(tiny_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    monkeypatch.setattr("ayar.serve.backend_choice._missing", lambda backend: "")
    choice = choose_backend(ServeSettings(source=str(run), backend="auto"), print, build=fake_export(run, False))
    assert choice.backend == "transformers" and choice.source == str(run)
    assert "gguf: release gate failed: top-1 agreement: mean 0.80" in choice.warning
    with pytest.raises(AyarError, match="--backend gguf cannot serve this run: gguf: release gate failed"):
        choose_backend(ServeSettings(source=str(run), backend="gguf"), print, build=fake_export(run, False))


def test_transformers_where_it_is_needed(tiny_run, tmp_path, monkeypatch):
    def never(*a):
        raise AssertionError("no export should be built")

    root = ServeSettings(source=str(tiny_run), backend="auto", adapter_root=str(tiny_run.parent))
    assert "adapters loaded at run time" in choose_backend(root, print, never).reason
    assert choose_backend(ServeSettings(source="default", backend="auto"), print, never).backend == "transformers"
    assert (
        choose_backend(ServeSettings(source=str(tiny_run), backend="transformers"), print, never).reason == "asked for"
    )
    monkeypatch.setattr("ayar.serve.backend_choice._gpu", lambda: True)
    assert "a GPU" in choose_backend(ServeSettings(source=str(tiny_run), backend="auto"), print, never).reason
    monkeypatch.setattr("ayar.serve.backend_choice._gpu", lambda: False)
    monkeypatch.setattr("ayar.serve.backend_choice._missing", lambda backend: f"{backend} bindings not installed")
    choice = choose_backend(ServeSettings(source=str(tiny_run), backend="auto"), print, never)
    assert choice.backend == "transformers" and "gguf: gguf bindings not installed" in choice.warning
    with pytest.raises(AyarError, match="--backend onnx serves an export of a run"):
        choose_backend(ServeSettings(source="default", backend="onnx"), print, never)


def test_adapters_per_request_on_gguf_lora_exports_or_a_fallback_that_names_why(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr("ayar.serve.backend_choice._missing", lambda backend: "")
    runs = {}
    for name in ("main", "math", "chat"):
        runs[name] = tmp_path / name
        shutil.copytree(tiny_run, runs[name])
    built = []

    def build(run_dir, fmt, kind, log):
        built.append((run_dir, kind))
        fake_export(Path(run_dir), "chat" not in run_dir)(run_dir, fmt, kind, log)

    adapters = {"math": str(runs["math"]), "chat": str(runs["chat"])}
    settings = ServeSettings(source=str(runs["main"]), backend="auto", adapters=adapters)
    choice = choose_backend(settings, print, build)
    assert [b[1] for b in built] == ["lora-q8_0"] * 3  # each run's GGUF LoRA export, built once
    assert choice.backend == "transformers" and "adapter chat: GGUF LoRA release gate failed" in choice.warning
    with pytest.raises(AyarError, match="--backend gguf cannot serve these adapters: adapter chat"):
        choose_backend(dataclasses.replace(settings, backend="gguf"), print, build)
    del adapters["chat"]
    choice = choose_backend(dataclasses.replace(settings, adapters=adapters), print, build)
    assert choice.backend == "gguf" and choice.source == str(runs["main"] / "export" / "gguf-lora-q8_0")
    assert len(built) == 3  # nothing rebuilt
    meta = json.loads((runs["math"] / "run.json").read_text())
    (runs["math"] / "run.json").write_text(json.dumps({**meta, "base_model": "another/model"}))
    choice = choose_backend(dataclasses.replace(settings, adapters=adapters), print, build)
    assert "adapter math was trained on another/model" in choice.warning
    with pytest.raises(AyarError, match="adapters chosen per request need --backend gguf or transformers"):
        choose_backend(dataclasses.replace(settings, backend="onnx"), print, build)


def test_serve_gguf_adapters_per_request_over_http(gguf_lora_runs, tmp_path, monkeypatch):
    """`ayar serve RUN --adapter lower=RUN2` picks the runs' gated GGUF LoRA exports: one base in llama.cpp, and
    each request's `model` answers as that run's merged export does."""
    import time

    from fastapi.testclient import TestClient

    from ayar.infer.gguf_engine import GgufEngine
    from ayar.serve.app import create_app

    monkeypatch.setitem(EXPORTS, "gguf", ("gguf", "f16"))  # the fixture's exports (a tiny model's near ties)
    upper, lower = gguf_lora_runs["upper"], gguf_lora_runs["lower"]
    settings = ServeSettings(
        source=str(upper), backend="auto", adapters={"lower": str(lower)}, db=f"sqlite:///{tmp_path / 'u.db'}"
    )
    question = [{"role": "user", "content": "What is 7 plus 5?"}]
    with TestClient(create_app(settings)) as c:
        for _ in range(600):
            if c.get("/ready").status_code != 503:
                break
            time.sleep(0.05)
        assert c.get("/ready").json()["backend"] == "llama.cpp"
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["base", upper.name, "lower"]
        for model, run in ((upper.name, upper), ("lower", lower)):
            body = {"model": model, "messages": question, "max_tokens": 8, "temperature": 0}
            got = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
            merged = GgufEngine(run / "export" / "gguf-f16")
            assert got == merged.generate(question, max_new_tokens=8, temperature=0).text, model
