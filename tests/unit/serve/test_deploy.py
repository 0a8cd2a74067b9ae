"""deploy/: Kubernetes manifests against the Kubernetes schemas, and the Dockerfile, compose file and
Prometheus config checked for what the server needs (non-root, probes on /ready and /health, scrape auth)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import tomllib
import yaml

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
K8S_VERSION = "1.33"


def manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((DEPLOY / "k8s").glob("*.yaml"))}


@pytest.mark.parametrize("name", sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml")))
def test_kubernetes_manifest_is_valid(name):
    import kubernetes_validate as kv

    kv.validate(manifests()[name], K8S_VERSION, strict=True)  # raises on unknown or mistyped fields


def test_kubernetes_objects_fit_together():
    m = manifests()
    dep, svc, hpa, cm, secret = (
        m[f] for f in ("deployment.yaml", "service.yaml", "hpa.yaml", "configmap.yaml", "secret.yaml")
    )
    pod = dep["spec"]["template"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # the container's arguments are ones `ayar serve` accepts, once Kubernetes fills in $(VARS)
    env = dict(cm["data"], AYAR_DB=secret["stringData"]["db"])
    args = [re.sub(r"\$\((\w+)\)", lambda v: env[v.group(1)], a) for a in container["args"]]
    from ayar.cli import serve

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    parsed = p.parse_args(args)
    assert parsed.db.startswith("postgresql+psycopg://") and parsed.max_batch == 8
    mounted = {i["path"] for v in pod["spec"]["volumes"] if "secret" in v for i in v["secret"]["items"]}
    assert {Path(parsed.api_keys).name, Path(parsed.admin_keys).name} <= mounted


def test_dockerfile_is_non_root_with_healthcheck_and_cpu_torch():
    text = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    assert "torch==2.13.0" in text and 'ENTRYPOINT ["ayar", "serve"]' in text
    extras = re.search(r'pip install "\.\[([\w,]+)\]"', text).group(1).split(",")
    declared = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) <= set(declared)


def test_compose_and_prometheus_scrape_the_server_with_a_key():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    ayar = compose["services"]["ayar"]
    assert ayar["build"]["dockerfile"] == "deploy/Dockerfile" and "/ready" in " ".join(ayar["healthcheck"]["test"])
    assert "--api-keys" in ayar["command"] and "api_keys" in compose["secrets"]
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"][0]
    assert prom["metrics_path"] == "/metrics" and prom["authorization"]["type"] == "Bearer"
    assert prom["static_configs"][0]["targets"] == ["ayar:8000"] and "8000:8000" in ayar["ports"]


# --- multi-node training: Kubernetes indexed Job + headless Service, Slurm --------------------------------


def _render(*args):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(DEPLOY / "train" / "render_job.py"), *args], capture_output=True, text=True, check=True
    ).stdout
    return list(yaml.safe_load_all(out))


@pytest.mark.parametrize("gpus", [8, 0])
def test_the_training_job_is_valid_and_its_pods_meet_at_pod_0(gpus):
    import kubernetes_validate as kv

    from ayar.cli import train
    from ayar.cli.train import launch_command

    service, job = _render("--image", "r/ayar:1", "--nodes", "4", "--gpus-per-node", str(gpus), "--config", "/w/c.yaml")
    for doc in (service, job):
        kv.validate(doc, K8S_VERSION, strict=True)
    pod = job["spec"]["template"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 4
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == pod["metadata"]["labels"]
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    container = pod["spec"]["containers"][0]
    assert container["resources"].get("limits", {}).get("nvidia.com/gpu") == (gpus or None)
    # the arguments are ones `ayar train` accepts once Kubernetes fills in the pod's index, and they start
    # torchrun with this pod as node 2 of 4, meeting at pod 0 through the headless Service
    argv = [a.replace("$(JOB_COMPLETION_INDEX)", "2") for a in container["args"]]
    assert container["command"] == ["ayar"] and argv[0] == "train"
    p = argparse.ArgumentParser()
    train.add_arguments(p)
    args = p.parse_intermixed_args(argv[1:])
    cmd = launch_command(args, argv[1:])
    name = job["metadata"]["name"]
    assert cmd[cmd.index("--nnodes") + 1] == "4" and cmd[cmd.index("--node-rank") + 1] == "2"
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == f"{name}-0.{name}:29500"
    assert cmd[cmd.index("--nproc-per-node") + 1] == str(max(gpus, 1)) and cmd[-4:] == [
        "-m",
        "ayar",
        "train",
        "/w/c.yaml",
    ]


def test_the_committed_job_example_is_the_scripts_output():
    args = ["--image", "registry.example.com/ayar:0.1.0", "--nodes", "4", "--gpus-per-node", "8"]
    args += ["--config", "/work/configs/qwen-sft.yaml", "--name", "qwen-sft"]
    assert _render(*args) == list(yaml.safe_load_all((DEPLOY / "train" / "job-example.yaml").read_text()))


def test_the_slurm_scripts_torchrun_line_parses():
    import shlex

    from torch.distributed.run import get_args_parser

    text = (DEPLOY / "train" / "slurm.sbatch").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("srun torchrun "))
    env = {"SLURM_NNODES": "4", "GPUS_PER_NODE": "8", "HEAD": "node001", "SLURM_JOB_ID": "77", "CONFIG": "c.yaml"}
    words = [
        re.sub(r"\$(\w+)", lambda m: env[m.group(1)], w) for w in shlex.split(line)[2:] if w != '"$@"' and w != "$@"
    ]
    args = get_args_parser().parse_args(words)
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint) == (
        "4",
        "8",
        "c10d",
        "node001:29500",
    )
    assert args.module and args.training_script == "ayar" and args.training_script_args == ["train", "c.yaml"]
    assert "#SBATCH --ntasks-per-node=1" in text  # one torchrun per node
