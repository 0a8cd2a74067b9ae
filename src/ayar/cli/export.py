"""Export a finished run as a deployable model, and verify that it behaves like the run (release gate).

examples:
  ayar export runs/quickstart-20261125-101500                      merged fp32 safetensors in RUN/export/merged-fp32
  ayar export runs/quickstart-20261125-101500 --dtype bf16 --out models/quickstart
  ayar export runs/quickstart-20261125-101500 --to onnx --quant int8    ONNX Runtime GenAI model in RUN/export/onnx-int8
  ayar export runs/quickstart-20261125-101500 --to gguf --quant q8_0    GGUF + Ollama Modelfile in RUN/export/gguf-q8_0
  ayar export runs/quickstart-20261125-101500 --no-verify

The gate loads the export in its own runtime (transformers, onnxruntime-genai, llama.cpp), renders fixed prompts
with its own tokenizer and chat template and compares with the run's model: identical prompt tokens, the
answer stops where the run's model stops, and teacher-forced top-1 agreement within the tolerance for
the dtype or quantization. It prints PASS/FAIL per check, writes gate.json beside the export, and exits 1
on FAIL.
"""


def add_arguments(p) -> None:
    import argparse

    p.add_argument("run", help="a finished run directory")
    p.add_argument("--to", default="merged", choices=("merged", "onnx", "gguf"),
                   help="merged: transformers safetensors; onnx: ONNX Runtime GenAI with KV cache; "
                        "gguf: llama.cpp / Ollama (with a Modelfile)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights dtype of a merged export")
    p.add_argument("--quant", choices=("fp32", "int8", "int4", "f16", "q8_0", "q4_k_m", "q4_0"),
                   help="onnx: fp32, int8 (default), int4; gguf: f16, q8_0 (default), q4_k_m, q4_0")
    p.add_argument("--out", help="output directory (default: RUN/export/KIND-DTYPE|QUANT)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="run the release gate on the export (default: on)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer length the gate compares")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the verified export to this hub repository")


def run(args) -> int:
    from pathlib import Path

    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    log = lambda m: console.print(m)  # noqa: E731
    kind = args.dtype if args.to == "merged" else args.quant or {"onnx": "int8", "gguf": "q8_0"}[args.to]
    out = Path(args.out or Path(args.run) / "export" / f"{args.to}-{kind}")
    artifact_path = out
    if args.to == "onnx":
        from ayar.export.onnx import export_onnx

        export_onnx(args.run, out, kind, log=log)
    elif args.to == "gguf":
        from ayar.export.gguf import export_gguf

        artifact_path = export_gguf(args.run, out, kind, log=log)
    else:
        from ayar.export.merged import export_merged

        export_merged(args.run, out, args.dtype, log=log)
    if args.verify:
        ok = gate(args.run, artifact_path, args.to, kind, args.max_new_tokens, log)
        if not ok:
            return 1
    if args.push_to_hub:
        push(out, args.push_to_hub, log)
    return 0


def gate(run_dir, out, to: str, kind: str, max_new_tokens: int, log) -> bool:
    from ayar.export.gate import MergedArtifact, verify
    from ayar.export.merged import load_run

    log("release gate: the export against the run's model")
    engine, _ = load_run(run_dir, log=lambda *_: None)
    if to == "onnx":
        from ayar.export.onnx import OnnxArtifact

        artifact = OnnxArtifact(out)
    elif to == "gguf":
        from ayar.export.gguf import GgufArtifact

        artifact = GgufArtifact(out)
    else:
        artifact = MergedArtifact(out)
    report = verify(engine, artifact, kind, str(out), max_new_tokens, log=log)
    report.write((out.parent if out.is_file() else out) / "gate.json")
    for c in report.checks:
        log(f"  {'[green]PASS[/]' if c.ok else '[red]FAIL[/]'}  {c.name}: {c.detail}")
    log(f"gate {'passed' if report.ok else 'FAILED'}: {(out.parent if out.is_file() else out) / 'gate.json'}")
    return report.ok


def push(folder, repo: str, log) -> None:
    from ayar.errors import AyarError
    from ayar.hub import hub_reachable

    if not hub_reachable():
        raise AyarError(f"cannot push to {repo}: the model hub is not reachable from here (no network); "
                        f"the export is in {folder}, push it later with `huggingface-cli upload {repo} {folder}`")
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo)
    log(f"pushed {folder} to {repo}")
