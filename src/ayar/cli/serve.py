"""Serve a run directory or model over an OpenAI-compatible HTTP API.

examples:
  ayar serve runs/quickstart-20261125-101500      (on a CPU: its gated GGUF export, built once if missing)
  ayar serve runs/quickstart-20261125-101500 --backend transformers
  ayar serve default --adapter math=runs/math-1 --adapter chat=runs/chat-2 --port 8080
  ayar serve runs/v2 --api-keys keys.txt --rate-limit 60 --alias assistant=v1:0.9,v2:0.1 --adapter v1=runs/v1
  ayar serve runs/v2 --engine vllm          (run vLLM on the same base + adapters; without vLLM: print the command)

Clients: any OpenAI client with base_url http://HOST:PORT/v1; `model` is `base`, the run's name or an
adapter name (GET /v1/models lists them). API keys: --api-keys FILE (one per line, raw or sha256:<hex>)
or AYAR_API_KEYS=k1,k2; admin keys (adapter load/unload): --admin-keys FILE or AYAR_ADMIN_KEYS.
"""


def add_arguments(p) -> None:
    p.add_argument("source", help="run directory, local model directory, or `default`")
    p.add_argument("--name", help="public model name of the source's adapter (default: the run directory's name)")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve another LoRA adapter (run directory or adapter folder) as model NAME; repeatable",
    )
    p.add_argument(
        "--adapter-root", help="folder that admin-loaded adapters must live in (enables POST /admin/adapters)"
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "transformers", "gguf", "onnx"),
        help="auto (default): on a CPU, the fastest backend with an export of the run that passed its release gate "
        "(a GGUF q8_0 one is built once if there is none); a failed gate falls back to transformers, with the reason",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys", metavar="FILE", help="API keys, one per line (also AYAR_API_KEYS=k1,k2)")
    p.add_argument("--admin-keys", metavar="FILE", help="admin keys, one per line (also AYAR_ADMIN_KEYS)")
    p.add_argument("--rate-limit", type=float, default=0, metavar="N", help="requests per minute per API key (0: off)")
    p.add_argument("--rate-burst", type=int, default=20)
    p.add_argument("--max-batch", type=int, default=8, help="rows generated together")
    p.add_argument("--max-queue", type=int, default=64, help="rows waiting; beyond this requests get 429")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=256)
    p.add_argument("--cache-size", type=int, default=512, help="cached deterministic responses (0: no cache)")
    p.add_argument("--cache-ttl", type=float, default=600, help="seconds a cached response lives")
    p.add_argument(
        "--db",
        help="profiles/history database URL (default: sqlite file in $AYAR_HOME); "
        "postgresql+psycopg://user:pw@host/db for several replicas",
    )
    p.add_argument("--history-turns", type=int, default=5, help="stored exchanges put before a request with `user`")
    p.add_argument(
        "--alias",
        action="append",
        default=[],
        metavar="ALIAS=M1:W1,M2:W2",
        help="A/B split: requests for ALIAS go to M1 or M2 by weight, sticky per user",
    )
    p.add_argument(
        "--engine",
        choices=("ayar", "vllm"),
        default="ayar",
        help="vllm: run vLLM's server on the same base and adapters where it is installed (a GPU box); "
        "elsewhere print the command and say what is missing",
    )


def run(args) -> int:
    import importlib.util
    import sys

    from ayar.errors import AyarError

    settings = settings_from_args(args)
    if args.engine == "vllm":
        return serve_with_vllm(settings)
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise AyarError("ayar serve needs the serve extra: pip install -e '.[serve]'")
    import uvicorn

    from ayar.serve.app import create_app

    if not settings.api_keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: serving on {args.host} without API keys: anyone who reaches this port can use it "
            "(pass --api-keys FILE)",
            file=sys.stderr,
        )
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


def settings_from_args(args):
    from ayar.errors import AyarError
    from ayar.serve.auth import read_keys
    from ayar.serve.backend import valid_name
    from ayar.serve.routing import parse_alias
    from ayar.serve.settings import ServeSettings

    adapters = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise AyarError(f"--adapter {spec!r}: write NAME=PATH, e.g. --adapter math=runs/math-20261125-1015")
        if not valid_name(name):
            raise AyarError(f"--adapter {spec!r}: name it with letters, digits, '_', '-', '.' (not 'base')")
        adapters[name] = path
    aliases = dict(parse_alias(a) for a in args.alias)
    return ServeSettings(
        source=args.source,
        backend=args.backend,
        name=args.name,
        adapters=adapters,
        adapter_root=args.adapter_root,
        api_keys=read_keys(args.api_keys, "AYAR_API_KEYS"),
        admin_keys=read_keys(args.admin_keys, "AYAR_ADMIN_KEYS"),
        rate_per_minute=args.rate_limit,
        rate_burst=args.rate_burst,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        cache_size=args.cache_size,
        cache_ttl=args.cache_ttl,
        db=args.db,
        history_turns=args.history_turns,
        aliases=aliases,
    )


def serve_with_vllm(settings) -> int:
    """Run vLLM's server on the same base and adapters where vLLM is installed; elsewhere say what is missing
    and print the command for a GPU box."""
    import importlib.util
    import shlex
    import shutil
    import subprocess
    import sys

    command = vllm_command(settings)
    if importlib.util.find_spec("vllm") is None or shutil.which("vllm") is None:
        print(command)
        print(
            "vLLM is not installed here (it serves on NVIDIA GPUs: `pip install vllm` on a GPU box, then run the "
            "command above; `ayar export RUN --to vllm` writes a folder with it, a launch script and Kubernetes "
            "manifests)",
            file=sys.stderr,
        )
        return 2
    import os

    argv, env = shlex.split(command), dict(os.environ)
    if "--api-key" in argv:  # vLLM reads VLLM_API_KEY itself; a hashed key cannot be handed on
        i = argv.index("--api-key")
        del argv[i : i + 2]
        plain = [k for k in settings.api_keys if not k.startswith("sha256:")]
        if "VLLM_API_KEY" not in env and not plain:
            print("the API keys are stored hashed: set VLLM_API_KEY for vLLM", file=sys.stderr)
            return 2
        env.setdefault("VLLM_API_KEY", plain[0] if plain else "")
    print(f"launch {' '.join(argv)}", file=sys.stderr)
    return subprocess.call(argv, env=env)


def vllm_command(settings) -> str:
    """The vLLM command serving the same base model and LoRA adapters (OpenAI API, GPU)."""
    import shlex
    from pathlib import Path

    source, adapters = Path(settings.source), dict(settings.adapters)
    base = settings.source
    if (source / "run.json").is_file():
        from ayar.rundir import RunDir

        base = RunDir(source).adapter_base()  # a chained run's adapter says
        adapters = {settings.name or source.resolve().name: str(source / "adapter"), **adapters}
    adapters = {n: str(Path(p) / "adapter") if (Path(p) / "run.json").is_file() else p for n, p in adapters.items()}
    cmd = ["vllm", "serve", base, "--port", "8000"]
    if adapters:
        cmd += ["--enable-lora", "--lora-modules", *(f"{n}={p}" for n, p in adapters.items())]
    if settings.api_keys:
        cmd += ["--api-key", "$VLLM_API_KEY"]
    return " ".join(shlex.quote(c) if not c.startswith("$") else c for c in cmd)
