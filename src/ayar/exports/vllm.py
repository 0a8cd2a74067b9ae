"""`ayar export RUN --to vllm`: a folder a GPU box serves as is with vLLM's OpenAI-compatible server.

    <out>/adapters/<name>/     the run's adapter (it applies to the base named in its adapter_config.json;
                               a chained run's adapter holds the earlier runs' too)  -- kind `lora`
    <out>/model/               or the adapter merged into the base (fp16)           -- kind `merged`
    <out>/chat_template.jinja  renders prompts exactly as training did (system prompt, alpaca template)
    <out>/launch.sh            `vllm serve ... --enable-lora --lora-modules <name>=...`
    <out>/k8s/                 Deployment, Service and HorizontalPodAutoscaler running the same command
    <out>/README.md

The release gate checks what it can without a GPU: the folder's adapter, loaded with plain transformers + peft
onto the base the launch script names and prompted through the exported chat template (the merged model, for
`merged`), gives the run's greedy answers. vLLM itself needs a GPU and is not run here.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import torch

from ayar.errors import AyarError
from ayar.exports.gate import MergedArtifact
from ayar.fsutil import atomic_directory, claim_output, shareable

KINDS = ("lora", "merged")
IMAGE = "vllm/vllm-openai:latest"
PORT = 8000


def export_vllm(run_dir: str | Path, out: str | Path, kind: str = "lora", log=print, force: bool = False) -> Path:
    from ayar.exports.merged import chat_template_for, export_merged, load_run

    if kind not in KINDS:
        raise AyarError(f"--to vllm takes --kind {' or '.join(KINDS)}, not {kind!r}")
    out = Path(out)
    claim_output(out, force)
    engine, run = load_run(run_dir, log=lambda *_: None)
    full = run.full_model.is_dir()
    if full and kind == "lora":
        kind = "merged"  # a full fine-tune has no adapter: the model is the weights
        log("a full fine-tune: exporting the whole model (kind merged)")
    name = run.path.name
    template = chat_template_for(engine)
    with atomic_directory(out, mark=f"ayar export --to vllm --kind {kind} of {run.path}") as tmp:
        tmp = Path(tmp)
        if kind == "lora":
            adapter_cfg = json.loads((run.adapter / "adapter_config.json").read_text())
            base, rank = adapter_cfg["base_model_name_or_path"], _rank(adapter_cfg)
            shutil.copytree(run.adapter, tmp / "adapters" / name)
            serve = ["vllm", "serve", base, "--enable-lora", "--lora-modules", f"{name}=adapters/{name}"]
            serve += ["--max-lora-rank", str(rank)]
        else:
            export_merged(run.path, tmp / "model", "fp16", log=log, engine=engine, force=True)
            base, serve = "model", ["vllm", "serve", "model", "--served-model-name", name]
        (tmp / "chat_template.jinja").write_text(template)
        serve += ["--chat-template", "chat_template.jinja", "--host", "0.0.0.0", "--port", str(PORT)]
        (tmp / "launch.sh").write_text(_launch_script(serve))
        (tmp / "launch.sh").chmod(0o755)
        (tmp / "k8s").mkdir()
        for file, doc in manifests(name, serve).items():
            (tmp / "k8s" / file).write_text(_yaml(doc))
        (tmp / "README.md").write_text(_readme(run, name, kind, base, serve))
    shareable(out)
    log(f"wrote {out} (vLLM, {kind}; serve with {out / 'launch.sh'} on a GPU box)")
    return out


def _rank(adapter_cfg: dict) -> int:
    """vLLM's --max-lora-rank: a value it accepts (powers of two from 8), at least the adapter's rank."""
    r = max([adapter_cfg.get("r", 8), *(adapter_cfg.get("rank_pattern") or {}).values()])
    return next(v for v in (8, 16, 32, 64, 128, 256, 320, 512) if v >= r) if r <= 512 else r


def _launch_script(serve: list[str]) -> str:
    return (
        "#!/bin/sh\n# Serve this export with vLLM (a GPU box with `pip install vllm`); run from any folder.\n"
        'cd "$(dirname "$0")"\nexec ' + " ".join(shlex.quote(w) for w in serve) + ' "$@"\n'
    )


def manifests(name: str, serve: list[str]) -> dict[str, dict]:
    """Deployment / Service / HPA for vLLM serving this export from a volume (a PVC named `<name>-export`
    holding the folder)."""
    labels = {"app": f"{name}-vllm"}
    container = {
        "name": "vllm",
        "image": IMAGE,
        "command": serve[:2],
        "args": serve[2:],
        "workingDir": "/export",
        "ports": [{"name": "http", "containerPort": PORT}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
        "startupProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "failureThreshold": 90},
        "resources": {"limits": {"nvidia.com/gpu": 1}},
        "volumeMounts": [{"name": "export", "mountPath": "/export", "readOnly": True}],
    }
    return {
        "deployment.yaml": {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": f"{name}-vllm", "labels": dict(labels)},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": dict(labels)},
                "template": {
                    "metadata": {"labels": dict(labels)},
                    "spec": {
                        "containers": [container],
                        "volumes": [{"name": "export", "persistentVolumeClaim": {"claimName": f"{name}-export"}}],
                    },
                },
            },
        },
        "service.yaml": {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"{name}-vllm", "labels": dict(labels)},
            "spec": {"selector": dict(labels), "ports": [{"name": "http", "port": PORT, "targetPort": "http"}]},
        },
        "hpa.yaml": {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": f"{name}-vllm"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{name}-vllm"},
                "minReplicas": 1,
                "maxReplicas": 4,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}},
                    }
                ],
            },
        },
    }


def _yaml(doc: dict) -> str:
    import yaml

    return yaml.safe_dump(doc, sort_keys=False)


def _readme(run, name: str, kind: str, base: str, serve: list[str]) -> str:
    what = (
        f"the run's adapter in `adapters/{name}` (served as the model `{name}`) on the base `{base}`: that path "
        "must exist on the GPU box (copy it there, or edit launch.sh to the same model's hub id)"
        if kind == "lora"
        else f"the adapter merged into the base in `model/` (fp16), served as `{name}`"
    )
    return (
        f"# {name} for vLLM\n\nExported by ayar from `{run.path}`: {what}. `chat_template.jinja` renders prompts "
        "as training did.\n\n```sh\n./launch.sh            # on a GPU box with vLLM installed\n"
        f"curl localhost:{PORT}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f'  -d \'{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello"}}]}}\'\n```\n\n'
        f"Kubernetes: `k8s/` runs the same command (`{' '.join(serve[:3])} ...`) from a volume holding this folder "
        f"(a PersistentVolumeClaim `{name}-export`).\n\nThe release gate (gate.json) checked the folder with plain "
        "transformers + peft on CPU; vLLM itself was not run here.\n"
    )


class VllmArtifact(MergedArtifact):
    """The export as a user of its folder gets it, without vLLM: the base the launch script names with the
    adapter on top through plain peft (or the merged model), prompted through the exported chat template."""

    def __init__(self, folder: str | Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ayar.data.render import stop_token_ids

        folder = Path(folder)
        adapters = sorted((folder / "adapters").iterdir()) if (folder / "adapters").is_dir() else []
        source = adapters[0] if adapters else folder / "model"
        self.tok = AutoTokenizer.from_pretrained(source)
        self.tok.chat_template = (folder / "chat_template.jinja").read_text()
        if adapters:
            from peft import PeftModel

            base = json.loads((source / "adapter_config.json").read_text())["base_model_name_or_path"]
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), source)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        self.model = model.eval()
        # vLLM stops at EOS, the generation config's stop tokens and the chat template's end-of-turn token
        self.stop_ids = set(stop_token_ids(self.tok, model))

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=sorted(self.stop_ids),
                pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id,
            )
        return out[0, len(ids) :].tolist()
