"""The web UI: train, follow runs, chat, evaluate, export and serve in a browser (gradio).

Everything it does is also a command; paths typed into it must lie inside the working folder (where you start
it). It listens on 127.0.0.1 unless --host says otherwise, and then only with --auth.

examples:
  ayar ui                                   # http://127.0.0.1:7860
  ayar ui --runs runs --port 7861
  ayar ui --host 0.0.0.0 --auth users.txt   # users.txt: lines user:password (or user:sha256:<hex>)
"""


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (other than loopback: needs --auth)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--runs", default="runs", help="the run directories' folder, inside the working folder")
    p.add_argument("--auth", default=None, help="file of user:password lines for the login page")


def run(args) -> int:
    import importlib.util
    import sys

    if importlib.util.find_spec("gradio") is None:
        print("ayar ui needs gradio: pip install 'ayar[ui]'", file=sys.stderr)
        return 2
    from ayar.ui.app import launch

    print(f"ayar ui on http://{args.host}:{args.port}  (Ctrl-C stops it; running jobs go on)", flush=True)
    launch(args.host, args.port, ".", args.runs, args.auth)
    return 0
