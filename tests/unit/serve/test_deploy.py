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
