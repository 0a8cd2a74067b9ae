"""`ayar serve RUN` picks its runtime: the gated GGUF export (built once, then reused), a fallback to transformers
naming the failed gate check, transformers where it is needed; and says why each time."""

from __future__ import annotations

import json
import shutil

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

    adapters = ServeSettings(source=str(tiny_run), backend="auto", adapters={"math": str(tiny_run)})
    assert "adapters chosen per request" in choose_backend(adapters, print, never).reason
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
