"""One UI job (ui/jobs.py) in its own process: `python -m ayar.ui.worker JOB.json` calls the API function the
job names and writes JOB.result.json ({state: done | failed, error, ...}); its output goes to JOB.log."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def _train(args: dict) -> dict:
    from ayar import api

    run = api.train(args.get("config"), resume=args.get("resume") or None, nproc=int(args.get("nproc") or 1))
    return {"run": str(run.path), "status": run.meta.get("status")}


def _eval(args: dict) -> dict:
    from ayar import api

    result = api.evaluate(args["run"], args.get("data") or None, **args.get("options", {}))
    return {"verdict": getattr(result, "verdict", None)}


def _export(args: dict) -> dict:
    from ayar import api

    out = api.export(args["run"], to=args["to"], kind=args.get("kind") or None, force=True)
    return {"folder": str(out.folder), "ok": bool(out.gate.ok) if out.gate is not None else None}


def _serve(args: dict) -> dict:
    import uvicorn

    from ayar import api

    app = api.create_app(args["run"], **({"api_keys": [args["key"]]} if args.get("key") else {}))
    uvicorn.run(app, host="127.0.0.1", port=int(args["port"]), log_level="warning")
    return {}


RUNNERS = {"train": _train, "eval": _eval, "export": _export, "serve": _serve}


def main(job_file: str) -> int:
    from ayar.errors import AyarError
    from ayar.fsutil import write_atomic

    job = json.loads(Path(job_file).read_text())
    result_file = Path(job["log"]).with_suffix(".result.json")
    try:
        result = {"state": "done", **RUNNERS[job["kind"]](job["args"])}
    except AyarError as e:  # a user's mistake: the message says how to fix it
        print(f"error: {e}", flush=True)
        result = {"state": "failed", "error": str(e)}
    except Exception as e:  # a bug: the traceback in the log, one line in the page
        traceback.print_exc()
        result = {"state": "failed", "error": f"{type(e).__name__}: {e} (the traceback is in {job['log']})"}
    write_atomic(result_file, json.dumps(result, default=str))
    return 0 if result["state"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
