"""`ayar export --to merged` and the release gate, on tiny trained runs."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ayar.cli import main
from ayar.exports.gate import MergedArtifact, verify
from ayar.exports.merged import export_merged, load_run
from tests.helpers import MATH_ROWS, run_config, save_tiny, write_jsonl

quiet = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def merged(tiny_run, tmp_path_factory):
    return export_merged(tiny_run, tmp_path_factory.mktemp("export") / "merged", "fp32", **quiet)


def test_merged_export_is_complete_and_equals_the_run(tiny_run, merged):
    assert (merged / "model.safetensors").is_file() and not list(merged.glob("*.bin"))
    assert (merged / "tokenizer.json").is_file() and (merged / "README.md").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert (merged.stat().st_mode & 0o777) == 0o777 & ~umask  # not the private mode of the temp dir it was written in
    assert all((f.stat().st_mode & 0o777) == 0o666 & ~umask for f in merged.iterdir())
    config = json.loads((merged / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # for transformers-4 readers too
    engine, _ = load_run(tiny_run, **quiet)
    gen = json.loads((merged / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted(engine.stop_ids) and gen["do_sample"] is False
    art = MergedArtifact(merged)
    ids = engine.tok(engine.renderer.prompt_text([{"role": "user", "content": "What is 7 plus 5?"}]))["input_ids"]
    with torch.no_grad():
        ref = engine.model(input_ids=torch.tensor([ids])).logits
        got = art.model(input_ids=torch.tensor([ids])).logits
    assert torch.allclose(ref, got, atol=1e-4)  # the merge is the adapter, not an approximation of it


def test_gate_passes_a_faithful_export(tiny_run, merged):
    engine, _ = load_run(tiny_run, **quiet)
    report = verify(engine, MergedArtifact(merged), "fp32", str(merged), max_new_tokens=12, **quiet)
    assert report.ok, [c for c in report.checks if not c.ok]
    assert [c.name for c in report.checks] == ["prompt tokens", "stops at end of turn", "top-1 agreement"]
    assert all(p["top1_agreement"] == 1.0 and p["first_divergence"] is None for p in report.prompts)


def test_gate_fails_a_broken_chat_template_naming_the_mismatch(tiny_run, merged, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(merged, broken)
    cfg_path = broken / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    template_file = broken / "chat_template.jinja"
    if template_file.is_file():  # transformers 5 writes the template beside the config
        template_file.write_text(template_file.read_text().replace("<|im_start|>assistant\n", "<|im_start|>assistant:"))
    else:
        cfg["chat_template"] = cfg["chat_template"].replace("<|im_start|>assistant\n", "<|im_start|>assistant:")
        cfg_path.write_text(json.dumps(cfg))
    engine, _ = load_run(tiny_run, **quiet)
    report = verify(engine, MergedArtifact(broken), "fp32", str(broken), max_new_tokens=8, **quiet)
    assert not report.ok
    failed = {c.name: c.detail for c in report.checks if not c.ok}
    assert (
        "prompt tokens" in failed
        and "in the export but" in failed["prompt tokens"]
        and "in training" in failed["prompt tokens"]
    )
    # the CLI exits 1 on FAIL: re-export over the broken copy is not what we test; verify through the command
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "ok"), "--max-new-tokens", "8"]) == 0
    assert json.loads((tmp_path / "ok" / "gate.json").read_text())["ok"] is True


@pytest.mark.parametrize("extra", [["data.system_prompt=You are a careful math tutor."], ["data.template=alpaca"]])
def test_export_template_renders_what_training_rendered(tiny_model_dir, tmp_path, extra):
    """A run with a default system prompt, or trained with the alpaca template, exports a chat template that
    renders the same prompt tokens (checked by the gate)."""
    from ayar.config import load_config
    from ayar.training.sft import train_sft

    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    cfg = load_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            "model.dtype=float32",
            f"data.train={data}",
            f"output.dir={tmp_path / 'runs'}",
            "training.tracker=none",
            "training.max_steps=2",
            "data.val_ratio=0.2",
            "data.cache=false",
            *extra,
        ],
    )
    run = train_sft(cfg).path
    out = export_merged(run, tmp_path / "merged", "fp32", **quiet)
    engine, _ = load_run(run, **quiet)
    report = verify(engine, MergedArtifact(out), "fp32", str(out), max_new_tokens=6, **quiet)
    tokens = next(c for c in report.checks if c.name == "prompt tokens")
    assert tokens.ok, tokens.detail
    assert len(report.prompts) == (3 if "alpaca" in extra[0] else 4)  # alpaca: single-turn prompts only


def test_bf16_export_and_push_without_network(tiny_run, tmp_path, monkeypatch):
    out = export_merged(tiny_run, tmp_path / "bf16", "bf16", **quiet)
    art = MergedArtifact(out)
    assert art.model.dtype == torch.bfloat16
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from ayar.cli.export import push
    from ayar.errors import AyarError

    with pytest.raises(AyarError, match="not reachable"):
        push(out, "me/model", print)
    with pytest.raises(SystemExit):
        main(["export", str(tiny_run), "--dtype", "fp8"])  # argparse refuses unknown dtypes


def test_gate_fails_an_export_that_does_not_stop(tiny_run, merged):
    """Simulate an export that lost its end-of-turn token: the run's model (here told that its first answer
    token ends the turn) stops, the export, whose generation config does not know that token, does not."""
    from ayar.exports.gate import PROMPTS

    engine, _ = load_run(tiny_run, **quiet)
    ids = engine.tok(engine.renderer.prompt_text(PROMPTS[1]))["input_ids"]
    first = engine.greedy(ids, 1)[0]
    engine.stop_ids = set(engine.stop_ids) | {first}
    report = verify(
        engine, MergedArtifact(merged), "fp32", str(merged), max_new_tokens=8, prompts=[PROMPTS[1]], **quiet
    )
    failed = {c.name: c.detail for c in report.checks if not c.ok}
    assert list(failed) == ["stops at end of turn"] and "the export did not stop" in failed["stops at end of turn"]


def test_python_api_loads_runs_and_exports_alike(tiny_run, merged):
    import ayar

    run_answer = ayar.load(tiny_run, log=lambda *_: None).generate(
        "What is 7 plus 5?", max_new_tokens=8, preset="deterministic"
    )
    export_answer = ayar.load(merged, log=lambda *_: None).generate(
        "What is 7 plus 5?", max_new_tokens=8, preset="deterministic"
    )
    assert export_answer.text == run_answer.text and export_answer.new_tokens == run_answer.new_tokens


# --- ONNX (onnxruntime-genai) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory):
    """A tiny run whose heads are 16 wide: ONNX Runtime's GroupQueryAttention needs a multiple of 16."""
    from ayar.training.sft import train_sft

    tmp = tmp_path_factory.mktemp("onnxrun")
    model_dir = save_tiny(tmp / "model", "qwen2", hidden_size=64)
    data = write_jsonl(tmp / "d.jsonl", MATH_ROWS)
    cfg = run_config(model_dir, data, tmp / "runs", "training.max_steps=2", "data.val_ratio=0.2", "data.cache=false")
    return train_sft(cfg).path


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_onnx_export_builds_loads_and_passes_the_gate(onnx_run, tmp_path, precision):
    import onnxruntime_genai  # noqa: F401  (make install installs the export extras: no silent skip)

    from ayar.exports.onnx import export_onnx
    from ayar.infer.onnx_engine import OnnxEngine

    out = export_onnx(onnx_run, tmp_path / f"onnx-{precision}", precision, **quiet)
    assert (out / "model.onnx").is_file() and (out / "genai_config.json").is_file()
    engine, _ = load_run(onnx_run, **quiet)
    art = OnnxEngine(out)
    assert set(art.stop_ids) == set(engine.stop_ids)  # the end-of-turn token made it into the ONNX runtime's config
    report = verify(engine, art, precision, str(out), max_new_tokens=12, **quiet)
    tokens = next(c for c in report.checks if c.name == "prompt tokens")
    assert tokens.ok, tokens.detail
    if precision == "fp32":
        assert report.ok and all(p["max_logprob_error"] < 1e-3 for p in report.prompts)
    assert not list(tmp_path.glob(".tmp-onnx-*"))  # the intermediate merged model is cleaned up


def test_onnx_gate_catches_a_broken_template(onnx_run, tmp_path):
    import onnxruntime_genai  # noqa: F401  (make install installs the export extras: no silent skip)

    from ayar.exports.onnx import export_onnx
    from ayar.infer.onnx_engine import OnnxEngine

    out = export_onnx(onnx_run, tmp_path / "onnx", "fp32", **quiet)
    for f in [out / "chat_template.jinja", out / "tokenizer_config.json"]:
        if f.is_file():
            f.write_text(f.read_text().replace("<|im_start|>assistant\n", "<|im_start|>assistant:"))
    engine, _ = load_run(onnx_run, **quiet)
    report = verify(engine, OnnxEngine(out), "fp32", str(out), max_new_tokens=4, **quiet)
    failed = {c.name: c.detail for c in report.checks if not c.ok}
    assert "prompt tokens" in failed and "in the export but" in failed["prompt tokens"]


def _chats_and_serves(out, kind: str, name: str, tmp_path) -> None:
    """`ayar.load`/`ayar chat` and `ayar serve` take the export: the server's greedy answers equal the
    runtime's own, streamed or not, one request or several at once."""
    import time

    from fastapi.testclient import TestClient

    import ayar
    from ayar.serve.app import create_app
    from ayar.serve.settings import ServeSettings

    engine = ayar.load(out)
    assert engine.kind == kind
    reply = engine.generate("What is 7 plus 5?", max_new_tokens=8)
    assert reply.new_tokens >= 1
    assert [r.text for r in engine.generate_batch(["What is 7 plus 5?", "hi"], max_new_tokens=8)][0] == reply.text
    assert main(["chat", str(out), "--prompt", "What is 7 plus 5?", "--max-new-tokens", "8"]) == 0
    app = create_app(ServeSettings(source=str(out), name=name, db=f"sqlite:///{tmp_path / 'u.db'}"))
    with TestClient(app) as c:
        for _ in range(200):
            if c.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        assert c.get("/ready").json()["backend"] == kind
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [name]
        body = {
            "model": name,
            "messages": [{"role": "user", "content": "What is 7 plus 5?"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        text = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        assert text.strip() == reply.text
        streamed = c.post("/v1/chat/completions", json={**body, "stream": True}).text
        chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"]) == text
        with ThreadPoolExecutor(3) as pool:  # rows share the runtime and all get the same answer
            answers = list(pool.map(lambda _: c.post("/v1/chat/completions", json=body).json(), range(3)))
        assert all(a["choices"][0]["message"]["content"] == text for a in answers)


def test_onnx_export_chats_and_serves(onnx_run, tmp_path):
    import onnxruntime_genai  # noqa: F401  (make install installs the export extras: no silent skip)

    from ayar.exports.onnx import export_onnx

    _chats_and_serves(export_onnx(onnx_run, tmp_path / "onnx", "fp32", **quiet), "onnxruntime-genai", "onnx", tmp_path)


# --- GGUF (llama.cpp) ------------------------------------------------------------------------------


def test_gguf_export_with_modelfile_passes_the_gate_in_llama_cpp(gguf_run, tmp_path):
    from ayar.exports.gguf import export_gguf
    from ayar.infer.gguf_engine import GgufEngine

    out = export_gguf(gguf_run, tmp_path / "gguf", "f16", **quiet)
    assert out.name == "model-f16.gguf" and out.stat().st_size > 0
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f16.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile  # ChatML, as the run's template
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile  # the template's own default system
    import llama_cpp  # noqa: F401

    engine, _ = load_run(gguf_run, **quiet)
    art = GgufEngine(out)
    report = verify(engine, art, "f16", str(out), max_new_tokens=12, **quiet)
    assert report.ok, [c for c in report.checks if not c.ok]
    assert min(p["top1_agreement"] for p in report.prompts) >= 0.95


def test_gguf_quantized_exports(gguf_run, tmp_path):
    import llama_cpp  # noqa: F401

    from ayar.exports.gguf import export_gguf
    from ayar.infer.gguf_engine import GgufEngine

    engine, _ = load_run(gguf_run, **quiet)
    for quant in ("q8_0", "q4_k_m"):
        out = export_gguf(gguf_run, tmp_path / quant, quant, **quiet)
        report = verify(engine, GgufEngine(out), quant, str(out), max_new_tokens=8, **quiet)
        assert next(c for c in report.checks if c.name == "prompt tokens").ok
        assert all(0 <= p["top1_agreement"] <= 1 for p in report.prompts)


def test_on_a_cpu_with_amx_llama_cpp_keeps_the_files_weight_layout(gguf_run, tmp_path, monkeypatch):
    """On a CPU with AMX llama.cpp's repacking for it crashed decoding q8_0 and Q4_K_M models (a segfault in
    test_gguf_quantized_exports on such a machine): there the engine loads them without extra buffer types, and
    answers as elsewhere; llama.cpp's defaults are back once the model is loaded."""
    import llama_cpp.llama_cpp as native

    from ayar.exports.gguf import export_gguf
    from ayar.infer import gguf_engine

    seen = []
    make = gguf_engine.model_params

    def spied(**fields):
        seen.append(fields)
        return make(**fields)

    monkeypatch.setattr(gguf_engine, "model_params", spied)
    out = export_gguf(gguf_run, tmp_path / "q8_0", "q8_0", **quiet)
    # the repacked path only where it does not crash: on a CPU without AMX
    cases = (True,) if gguf_engine.cpu_has_amx() else (True, False)
    answers = {}
    for amx in cases:
        monkeypatch.setattr(gguf_engine, "cpu_has_amx", lambda amx=amx: amx)
        engine = gguf_engine.GgufEngine(out)
        answers[amx] = engine.logprobs(engine.llm.tokenize(b"What is 7 plus 5?"))
    assert seen == [{"use_extra_bufts": False}, {}][: len(cases)]
    assert native.llama_model_default_params().use_extra_bufts  # llama.cpp's own default again
    with make(use_extra_bufts=False):
        assert not native.llama_model_default_params().use_extra_bufts
    assert bool(torch.isfinite(answers[True]).all())
    if False in answers:
        torch.testing.assert_close(answers[True], answers[False], atol=1e-2, rtol=0)


def test_gguf_export_chats_and_serves(gguf_run, tmp_path):
    import llama_cpp  # noqa: F401

    from ayar.exports.gguf import export_gguf

    _chats_and_serves(export_gguf(gguf_run, tmp_path / "gguf", "f16", **quiet).parent, "llama.cpp", "gguf", tmp_path)


def test_bench_infer_scores_every_format_on_the_same_tokens(onnx_run):
    import onnxruntime_genai  # noqa: F401  (make install installs the export extras: no silent skip)

    from ayar.perf.bench_infer import run_bench

    result = run_bench(onnx_run, ("merged-fp32", "merged-bf16", "onnx-fp32"), rows=3, max_new_tokens=6, **quiet)
    formats = result["formats"]
    assert result["rows"] == 3 and set(formats) == {"merged-fp32", "merged-bf16", "onnx-fp32"}
    assert formats["merged-fp32"]["speedup"] == 1.0 and formats["merged-fp32"]["perplexity_delta_pct"] == 0
    assert abs(formats["onnx-fp32"]["perplexity_delta_pct"]) < 0.1  # the same fp32 weights in another runtime
    assert formats["merged-bf16"]["perplexity_delta_pct"] != 0 and all(m["tokens_per_s"] > 0 for m in formats.values())
    assert (onnx_run / "export" / "onnx-fp32" / "genai_config.json").is_file()  # made on demand, reused next time


def _tree(folder):
    return {
        str(p.relative_to(folder)): (p.stat().st_mode & 0o777, p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def test_export_never_deletes_or_changes_a_folder_it_did_not_write(tiny_run, tmp_path):
    """`ayar export RUN --out DIR` used to delete DIR and everything in it (and the GGUF export chmod-ed what
    was there); now a non-empty folder that ayar did not write is refused, --force or not, and left as it was."""
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "todo.txt").write_text("keep me")
    (mine / "weights.bin").write_bytes(b"\x00" * 16)
    os.chmod(mine / "notes", 0o750)
    before = _tree(mine)
    for force in ([], ["--force"]):
        assert main(["export", str(tiny_run), "--out", str(mine), "--no-verify", *force]) == 2
        assert _tree(mine) == before


def test_an_earlier_export_is_replaced_only_with_force(tiny_run, tmp_path):
    out = tmp_path / "exp"
    assert main(["export", str(tiny_run), "--out", str(out), "--no-verify"]) == 0
    first = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["export", str(tiny_run), "--out", str(out), "--no-verify"]) == 2  # exists: refused
    assert (out / "model.safetensors").stat().st_mtime_ns == first
    assert main(["export", str(tiny_run), "--out", str(out), "--max-new-tokens", "4", "--force"]) == 0
    assert (out / "gate.json").is_file() and (out / "model.safetensors").stat().st_mtime_ns != first
    (out / "my-notes.md").write_text("added by the user")  # the folder is no longer only ayar's: never deleted
    assert main(["export", str(tiny_run), "--out", str(out), "--no-verify", "--force"]) == 2
    assert (out / "my-notes.md").read_text() == "added by the user"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]  # nothing left behind


def test_export_into_an_empty_folder_is_fine(tiny_run, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "empty"), "--no-verify"]) == 0


def test_a_failed_swap_puts_the_earlier_folder_back(tmp_path, monkeypatch):
    from ayar import fsutil

    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("earlier")
    real = os.replace

    def failing(src, dst):
        if str(src).startswith(str(tmp_path / ".tmp-")):
            raise OSError("disk went away")
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", failing)
    with pytest.raises(OSError, match="disk went away"):
        with fsutil.atomic_directory(final) as tmp:
            (tmp / "new.txt").write_text("new")
    assert (final / "keep.txt").read_text() == "earlier" and not (final / "new.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_gguf_lora_export_keeps_the_base_and_passes_the_gate(gguf_run, tmp_path):
    import llama_cpp  # noqa: F401

    from ayar.exports.workflow import export_run
    from ayar.infer.gguf_engine import gguf_adapter, gguf_file

    result = export_run(gguf_run, "gguf", "lora-f16", out=tmp_path / "lora", max_new_tokens=12, **quiet)
    folder = result.folder
    assert gguf_file(folder).name == "model-f16.gguf" and gguf_adapter(folder).name == "adapter-f16.gguf"
    assert gguf_adapter(folder).stat().st_size < gguf_file(folder).stat().st_size / 4  # the LoRA only
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f16.gguf\nADAPTER ./adapter-f16.gguf\n")
    assert json.loads((folder / "lora.json").read_text())["base"] == "f16"
    assert result.gate.ok, [c for c in result.gate.checks if not c.ok]
