"""`ayar bench serve`: ayar's server against a naive one that answers one request at a time with HF
`generate` (the seed's FastAPI example), same model, same prompts, in one invocation. Sides on the run's GGUF export
(RUN/export/gguf-q8_0, or a GGUF source itself): `ayar-gguf` (ayar's batched llama.cpp backend), `ayar-serial`
(that backend as it was: rows in turn) and `llama-server` (llama.cpp's own server on the same file with the same
number of parallel slots; benchmarks/build-llama-server.sh builds it). On the run's GGUF LoRA export
(RUN/export/gguf-lora-q8_0: the base and the adapter apart): `ayar-gguf-lora` (every request to the run's adapter,
applied unmerged) and `ayar-gguf-2lora` (a second adapter loaded, `--second-adapter`, requests alternating between
the two: a step with rows of both makes one decode per adapter). ayar's sides run with an API key (auth on), as a
deployment would.

Each server runs in its own subprocess on 127.0.0.1; closed-loop clients (each sends its next request
when the previous answer is in) drive it at each concurrency level. Throughput counts the completion
tokens the server reports; time to first token is measured on ayar's stream (the naive server cannot
stream, so for it TTFT is the whole latency, which is what its users wait). Every side first answers one
uncounted warm-up request (a server's first request pays one-time costs: with 2 requests at 1 client it was half
the figure), and every request opens its own connection (llama-server closes idle keep-alive connections, and a
request sent on one as it closes fails).

    python -m ayar.perf.bench_serve SIDE SOURCE PORT MAX_BATCH [SECOND_ADAPTER]     (a server of one side)
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ayar.netutil import free_port

SIDES = ("ayar", "naive")
GGUF_SIDES = ("ayar-gguf", "ayar-serial", "llama-server")
LORA_SIDES = ("ayar-gguf-lora", "ayar-gguf-2lora")
KEY = "bench-key"  # ayar's sides run with authentication on


def run_bench(
    source: str,
    concurrency=(1, 8, 32),
    requests_per_client: int = 4,
    max_tokens: int = 48,
    max_batch: int = 8,
    sides=SIDES,
    log=print,
    llama_server: str | None = None,
    second_adapter: str | None = None,
) -> dict:
    from ayar.data.sources import _sample

    questions = [json.loads(line)["instruction"] for line in _sample("gsm8k").read_text().splitlines() if line.strip()]
    results = {}
    for side in sides:
        port = free_port()
        log(f"[{side}] starting its server on 127.0.0.1:{port}")
        served = gguf_of(source) if side in GGUF_SIDES else lora_of(source) if side in LORA_SIDES else source
        command = [sys.executable, "-m", "ayar.perf.bench_serve", side, served, str(port), str(max_batch)]
        if side == "ayar-gguf-2lora":
            command.append(second_adapter or str(Path(lora_of(source)) / "adapter-f16.gguf"))
        if side == "llama-server":
            command = _llama_server_command(llama_server, served, port, max_batch)
        proc = subprocess.Popen(command, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        try:
            _wait_ready(port, proc, side)
            levels, first = {}, 0
            for c in concurrency:
                # new questions at every level: a server's prompt cache (llama-server keeps past prompts in RAM)
                # must not answer the next level's requests from the previous one's
                total = c * requests_per_client
                asked = questions[first : first + total] or questions
                first += total
                levels[c] = asyncio.run(_drive(port, side, asked, c, total, max_tokens, warm_up=not levels))
                log(
                    f"[{side}] {c:>2} clients: {levels[c]['tokens_per_s']:.1f} tok/s, TTFT p50 "
                    f"{levels[c]['ttft_p50']:.2f} s"
                )
            results[side] = levels
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    out = {
        "source": source,
        "max_tokens": max_tokens,
        "max_batch": max_batch,
        "requests_per_client": requests_per_client,
        "method": "one uncounted warm-up request per side first; a new connection per request for every side",
        "sides": results,
    }
    ratios = {}
    pairs = [("ayar", "naive"), ("ayar-gguf", "llama-server"), ("ayar-gguf", "ayar-serial")]
    pairs += [("ayar-gguf-lora", "ayar-gguf"), ("ayar-gguf-2lora", "ayar-gguf-lora")]
    for ours, other in pairs:
        if ours in results and other in results:
            ratios[f"{ours}/{other}"] = {
                c: results[ours][c]["tokens_per_s"] / results[other][c]["tokens_per_s"] for c in concurrency
            }
    if ratios:
        out["ratios"] = ratios
    if "ayar-gguf-2lora" in sides:
        out["second_adapter"] = second_adapter or "the run's own adapter loaded again under a second name"
    return out


def lora_of(source: str) -> str:
    """The GGUF LoRA export the adapter sides serve (RUN/export/gguf-lora-q8_0, else -f16)."""
    from ayar.errors import AyarError
    from ayar.exports.gguf_lora import KINDS
    from ayar.infer.gguf_engine import gguf_adapter

    for kind in KINDS:
        folder = Path(source) / "export" / f"gguf-{kind}"
        if gguf_adapter(folder) is not None:
            return str(folder)
    raise AyarError(f"the adapter sides need a GGUF LoRA export: `ayar export {source} --to gguf --kind lora`")


def gguf_of(source: str) -> str:
    """The GGUF the llama.cpp sides serve: the source itself, or a run's q8_0 export."""
    from ayar.errors import AyarError
    from ayar.infer.gguf_engine import gguf_file

    if gguf_file(source) is not None:
        return source
    folder = Path(source) / "export" / "gguf-q8_0"
    if gguf_file(folder) is None:
        raise AyarError(f"the llama.cpp sides need a GGUF: `ayar export {source} --to gguf` writes {folder}")
    return str(folder)


def _llama_server_command(binary: str | None, source: str, port: int, max_batch: int) -> list[str]:
    """llama.cpp's server on the same GGUF, with ayar's shape: `max_batch` parallel slots of 2048 tokens each (a
    KV stream per slot, as ayar's backend), all cores."""
    from ayar.errors import AyarError
    from ayar.infer.gguf_engine import gguf_file

    gguf = gguf_file(source)
    if not binary or gguf is None:
        raise AyarError(
            "the llama-server side needs --llama-server PATH (benchmarks/build-llama-server.sh builds it) and a GGUF "
            "source (a .gguf file or an `ayar export --to gguf` folder)"
        )
    return [
        binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(max_batch),
        "--ctx-size", str(2048 * max_batch), "--threads", str(os.cpu_count()), "--no-kv-unified", "--no-webui",
        "--log-disable",
    ]  # fmt: skip


async def _drive(
    port: int, side: str, questions: list[str], clients: int, total: int, max_tokens: int, warm_up: bool = False
) -> dict:
    import httpx

    queue, models = list(range(total)), ["bench"]
    ttft, latency, tokens, errors = [], [], 0, 0

    async def one(client: httpx.AsyncClient, i: int, counted: bool = True):
        """One request; `counted=False`: the warm-up, its own question, its figures dropped."""
        nonlocal tokens, errors
        question = "What is 2 + 3? Answer in one sentence." if i < 0 else questions[i % len(questions)]
        body = {
            "model": models[i % len(models)],
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        start, first, got = time.perf_counter(), None, 0
        if side == "naive":
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                errors += counted
                return
            first, got = time.perf_counter() - start, r.json()["usage"]["completion_tokens"]
        else:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    errors += counted
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        got += chunk["usage"]["completion_tokens"]
        if counted:
            ttft.append(first if first is not None else time.perf_counter() - start)
            latency.append(time.perf_counter() - start)
            tokens += got

    async def worker(client):
        while queue:
            await one(client, queue.pop())

    headers = {"Authorization": f"Bearer {KEY}"} if side.startswith("ayar") else {}
    # a connection per request, for every side: llama-server closes idle keep-alive connections, and a request
    # sent on one as it closes fails ("Server disconnected without sending a response")
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=600, headers=headers, limits=fresh
    ) as client:
        if side != "naive":  # the run's adapter if it has one, else the base model; both adapters on 2lora
            served = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
            models = served[-2:] if side == "ayar-gguf-2lora" else served[-1:]
        if warm_up:  # one request first, not counted: a server's first one pays its one-time costs
            await one(client, -1, counted=False)
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "models": models,
        "requests": total,
        "errors": errors,
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50": _pct(ttft, 50),
        "ttft_p95": _pct(ttft, 95),
        "ttft_p99": _pct(ttft, 99),
        "latency_p50": _pct(latency, 50),
        "latency_p95": _pct(latency, 95),
        "latency_p99": _pct(latency, 99),
    }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, round(p) - 1))]


def _wait_ready(port: int, proc, side: str, timeout: float = 600) -> None:
    import httpx

    from ayar.errors import AyarError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AyarError(f"the {side} benchmark server exited with code {proc.returncode} (its error is above)")
        try:
            path = "/health" if side == "llama-server" else "/ready"
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AyarError(f"the {side} benchmark server did not become ready within {timeout:.0f} s")


def _naive_app(engine):
    """The seed's server: `model.generate` per request, one at a time."""
    import threading

    from fastapi import FastAPI

    app, lock = FastAPI(), threading.Lock()

    @app.get("/ready")
    def ready():
        return {"status": "ready"}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        with lock:
            reply = engine.generate(body["messages"], max_new_tokens=body["max_tokens"], preset="deterministic")
        return {
            "choices": [{"message": {"role": "assistant", "content": reply.text}}],
            "usage": {"completion_tokens": reply.new_tokens},
        }

    return app


def _serve(side: str, source: str, port: int, max_batch: int, second: str | None = None) -> None:
    import uvicorn

    from ayar.infer.load import load_engine
    from ayar.serve.app import create_app
    from ayar.serve.settings import ServeSettings
    from ayar.serve.state import backend_for

    engine = load_engine(source, log=lambda *_: None)
    if side == "naive":
        app = _naive_app(engine)
    else:
        settings = ServeSettings(
            source=source, db="sqlite://", max_batch=max_batch, max_queue=1024, cache_size=0, api_keys=[KEY]
        )
        backend = backend_for(engine, "bench", max_batch)
        if side == "ayar-serial":  # ayar-gguf is the default backend of a GGUF engine
            from ayar.infer.gguf_engine import GgufEngine
            from ayar.serve.backend_gguf import SerialGgufBackend

            if not isinstance(engine, GgufEngine):
                raise SystemExit("the ayar-serial side is the llama.cpp backend's rows-in-turn version: a GGUF source")
            backend = SerialGgufBackend(engine, "bench")
        if side == "ayar-gguf-2lora":
            backend.load_adapter("bench-2", second)
        app = create_app(settings, backend=backend)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:6])
