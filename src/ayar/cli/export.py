"""Export a finished run as a deployable model, and verify that it behaves like the run (release gate).

examples:
  ayar export runs/quickstart-20261125-101500                      merged fp32 safetensors in RUN/export/merged-fp32
  ayar export runs/quickstart-20261125-101500 --dtype bf16 --out models/quickstart
  ayar export runs/quickstart-20261125-101500 --to onnx --quant int8    ONNX Runtime GenAI model in RUN/export/onnx-int8
  ayar export runs/quickstart-20261125-101500 --to gguf --quant q8_0    GGUF + Ollama Modelfile in RUN/export/gguf-q8_0
  ayar export runs/quickstart-20261125-101500 --to gguf --kind lora     base + LoRA GGUFs in RUN/export/gguf-lora-q8_0
  ayar export runs/quickstart-20261125-101500 --to vllm                 adapter + launch.sh + k8s/ for vLLM on a GPU box
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
    p.add_argument(
        "--to",
        default="merged",
        choices=("merged", "onnx", "gguf", "vllm"),
        help="merged: transformers safetensors; onnx: ONNX Runtime GenAI with KV cache; "
        "gguf: llama.cpp / Ollama (with a Modelfile); vllm: a folder vLLM serves on a GPU box (--kind lora|merged)",
    )
    p.add_argument(
        "--kind",
        choices=("lora", "merged"),
        help="vllm: the adapter on its base (default) or merged; gguf: merged (default) or lora (the base GGUF in "
        "--quant q8_0|f16 and the adapter as a GGUF LoRA beside it, for adapters chosen per request)",
    )
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights dtype of a merged export")
    p.add_argument(
        "--quant",
        choices=("fp32", "int8", "int4", "f16", "q8_0", "q4_k_m", "q4_0"),
        help="onnx: fp32, int8 (default), int4; gguf: f16, q8_0 (default), q4_k_m, q4_0",
    )
    p.add_argument("--out", help="output directory (default: RUN/export/KIND-DTYPE|QUANT); new or empty")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier export of ayar's in --out (a folder ayar did not write is never touched)",
    )
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the release gate on the export (default: on)",
    )
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer length the gate compares")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the verified export to this hub repository")


def run(args) -> int:
    from rich.console import Console

    from ayar.api import export

    console = Console(stderr=True, highlight=False)
    kind = {"merged": args.dtype, "vllm": args.kind}.get(args.to, args.quant)
    if args.to == "gguf" and args.kind == "lora":
        kind = f"lora-{args.quant or 'q8_0'}"
    result = export(
        args.run,
        to=args.to,
        kind=kind,
        out=args.out,
        verify=args.verify,
        max_new_tokens=args.max_new_tokens,
        force=args.force,
        log=console.print,
    )
    if not result.ok:
        return 1
    if args.push_to_hub:
        push(result.folder, args.push_to_hub, console.print)
    return 0


def push(folder, repo: str, log) -> None:
    from ayar.errors import AyarError
    from ayar.hub import hub_reachable

    if not hub_reachable():
        raise AyarError(
            f"cannot push to {repo}: the model hub is not reachable from here (no network); "
            f"the export is in {folder}, push it later with `huggingface-cli upload {repo} {folder}`"
        )
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo)
    log(f"pushed {folder} to {repo}")
