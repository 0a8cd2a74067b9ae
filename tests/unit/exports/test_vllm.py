"""`ayar export RUN --to vllm`: a folder a GPU box serves as is; the gate checks it with plain transformers + peft
(vLLM itself needs a GPU and is not run here)."""

import json
import shlex

import pytest

from ayar.exports.workflow import export_run

QUIET = dict(log=lambda *_: None)


@pytest.mark.parametrize("kind", ["lora", "merged"])
def test_a_vllm_export_passes_the_gate_and_its_manifests_are_valid(tiny_run, tmp_path, kind):
    import kubernetes_validate as kv
    import yaml

    out = tmp_path / "vllm"
    result = export_run(tiny_run, "vllm", kind, out, max_new_tokens=12, **QUIET)
    assert result.ok and (out / "gate.json").is_file() and json.loads((out / "gate.json").read_text())["ok"]
    argv = shlex.split(next(ln for ln in (out / "launch.sh").read_text().splitlines() if ln.startswith("exec ")))[1:]
    assert argv[:2] == ["vllm", "serve"] and argv[argv.index("--chat-template") + 1] == "chat_template.jinja"
    if kind == "lora":
        name, path = argv[argv.index("--lora-modules") + 1].split("=")
        adapter = json.loads((out / path / "adapter_config.json").read_text())
        assert name == tiny_run.name and argv[2] == adapter["base_model_name_or_path"]
        assert int(argv[argv.index("--max-lora-rank") + 1]) >= adapter["r"]
    else:
        assert argv[2] == "model" and (out / "model" / "config.json").is_file()
    docs = {p.name: yaml.safe_load(p.read_text()) for p in (out / "k8s").glob("*.yaml")}
    assert set(docs) == {"deployment.yaml", "service.yaml", "hpa.yaml"}
    for doc in docs.values():
        kv.validate(doc, "1.33", strict=True)
    container = docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] + container["args"] == argv[: len(container["command"] + container["args"])]
    assert docs["service.yaml"]["spec"]["selector"] == docs["deployment.yaml"]["spec"]["selector"]["matchLabels"]


def test_serve_with_the_vllm_engine_says_what_is_missing(tiny_run, capsys):
    from ayar.cli import main

    assert main(["serve", str(tiny_run), "--engine", "vllm"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("vllm serve ") and "vLLM is not installed here" in captured.err
