"""Render a multi-node `ayar train` as a Kubernetes indexed Job plus a headless Service (no operator needed).

    python deploy/train/render_job.py --image registry/ayar:0.1 --nodes 4 --gpus-per-node 8 \\
        --config /data/cfg.yaml --name qwen-sft > job.yaml && kubectl apply -f job.yaml

Each of the Job's `--nodes` pods runs `ayar train CONFIG --nproc GPUS --nnodes NODES --node-rank <its index>
--rdzv-endpoint <pod 0>:29500`, which starts torchrun there; pod 0 (`<name>-0.<name>`, through the headless
Service) is where the machines meet. The config and the run directory live on a shared volume (a
PersistentVolumeClaim, `--pvc`): only global rank 0 writes the run. deploy/train/job-example.yaml is this
script's output for the example above; tests/unit/serve/test_deploy.py validates it against the Kubernetes
schemas. Not yet run on a cluster.
"""

from __future__ import annotations

import argparse
import sys

import yaml

PORT = 29500


def render(name: str, image: str, nodes: int, gpus_per_node: int, config: str, pvc: str, mount: str) -> list[dict]:
    def labels() -> dict:  # a fresh copy each time: no YAML anchors in the output
        return {"app.kubernetes.io/name": "ayar-train", "ayar/job": name}

    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels()},
        "spec": {"clusterIP": "None", "selector": labels(), "ports": [{"name": "rdzv", "port": PORT}]},
    }
    args = [
        "train", config, "--nproc", str(max(1, gpus_per_node)), "--nnodes", str(nodes),
        "--node-rank", "$(JOB_COMPLETION_INDEX)", "--rdzv-endpoint", f"{name}-0.{name}:{PORT}",
    ]  # fmt: skip
    resources = {"limits": {"nvidia.com/gpu": gpus_per_node}} if gpus_per_node else {}
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels()},
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": 0,  # a failed node fails the run; rerun with `ayar train --resume` from the volume
            "template": {
                "metadata": {"labels": labels()},
                "spec": {
                    "subdomain": name,  # pod i is <name>-i.<name>: pod 0 is the rendezvous endpoint
                    "restartPolicy": "Never",
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
                    "containers": [
                        {
                            "name": "train",
                            "image": image,
                            "command": ["ayar"],
                            "args": args,
                            "ports": [{"name": "rdzv", "containerPort": PORT}],
                            "env": [{"name": "AYAR_HOME", "value": f"{mount}/.cache/ayar"}],
                            "resources": resources,
                            "volumeMounts": [
                                {"name": "work", "mountPath": mount},
                                {"name": "shm", "mountPath": "/dev/shm"},
                            ],
                            "workingDir": mount,
                        }
                    ],
                    "volumes": [
                        {"name": "work", "persistentVolumeClaim": {"claimName": pvc}},
                        {"name": "shm", "emptyDir": {"medium": "Memory"}},  # NCCL needs more than the default 64 MB
                    ],
                },
            },
        },
    }
    return [service, job]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True, help="a container image with ayar installed")
    p.add_argument("--nodes", type=int, required=True, help="machines (pods), one per node")
    p.add_argument("--gpus-per-node", type=int, required=True, help="processes (GPUs) per machine; 0: CPU")
    p.add_argument("--config", required=True, help="the training config's path inside the volume")
    p.add_argument("--name", default="ayar-train", help="the Job's and Service's name")
    p.add_argument("--pvc", default="ayar-work", help="PersistentVolumeClaim shared by the pods (config, runs)")
    p.add_argument("--mount", default="/work", help="where the volume is mounted (the working folder)")
    a = p.parse_args(argv)
    if a.nodes < 1 or a.gpus_per_node < 0:
        p.error("--nodes must be >= 1 and --gpus-per-node >= 0")
    docs = render(a.name, a.image, a.nodes, a.gpus_per_node, a.config, a.pvc, a.mount)
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
