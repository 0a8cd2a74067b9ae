"""The server over real HTTP (uvicorn on 127.0.0.1, not TestClient, which forgives a wrong Content-Length): every
route answers with a body whose length is the Content-Length it announced."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from ayar.netutil import free_port
from ayar.serve.app import create_app
from ayar.serve.settings import ServeSettings

uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    from ayar.infer.load import load_engine
    from ayar.serve.state import backend_for

    backend = backend_for(load_engine(tiny_run, log=lambda *_: None), "tuned")
    db = tmp_path_factory.mktemp("live") / "users.db"
    app = create_app(ServeSettings(source="unused", db=f"sqlite:///{db}", admin_keys=["adm"]), backend=backend)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield port
    srv.should_exit = True
    thread.join(timeout=10)


def _request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    payload = None if body is None else json.dumps(body).encode()
    conn.request(method, path, payload, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()  # http.client raises IncompleteRead when the body is shorter than announced
    length = response.getheader("Content-Length")
    conn.close()
    return response.status, length, data


CHAT = {"model": "tuned", "messages": [{"role": "user", "content": "What is 12 plus 30?"}], "max_tokens": 6}
ROUTES = [
    ("GET", "/health", None, {}),
    ("GET", "/ready", None, {}),
    ("GET", "/v1/models", None, {}),
    ("POST", "/v1/chat/completions", CHAT, {}),
    ("POST", "/v1/chat/completions", {**CHAT, "stream": True}, {}),
    ("POST", "/v1/completions", {"model": "tuned", "prompt": "12 plus 30 is", "max_tokens": 4}, {}),
    ("POST", "/v1/completions", {"model": "tuned", "prompt": "", "max_tokens": 4}, {}),
    ("POST", "/generate", {"prompt": "What is 12 plus 30?", "max_tokens": 6}, {}),
    ("GET", "/metrics", None, {}),
    ("GET", "/no/such/route", None, {}),
    ("POST", "/v1/chat/completions", {"messages": "not a list"}, {}),
    ("GET", "/admin/adapters", None, {"Authorization": "Bearer adm"}),
]


@pytest.mark.parametrize("method, path, body, headers", ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_every_route_sends_the_body_it_announces(server, method, path, body, headers):
    status, length, data = _request(server, method, path, body, headers)
    assert status < 500, data[:300]
    if length is not None:
        assert int(length) == len(data), f"{method} {path}: Content-Length {length}, body {len(data)} bytes"


def test_generate_over_http(server):
    status, length, data = _request(server, "POST", "/generate", {"prompt": "What is 12 plus 30?", "max_tokens": 6})
    assert status == 200 and int(length) == len(data)
    reply = json.loads(data)
    assert reply["status"] == "success" and isinstance(reply["response"], str)


def test_requests_under_load(server):
    """A bounded load on 127.0.0.1: 8 clients, 5 requests each, streaming and not, one with a bad row among them;
    every answer is a 200 or the 400 the bad request deserves, none a 5xx."""
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    from tests.reliability import report

    def client(k):
        out = []
        for j in range(5):
            body = {**CHAT, "max_tokens": 4, "stream": j % 2 == 1}
            if k == 3 and j == 2:
                body = {"model": "tuned", "prompt": "", "max_tokens": 4}
                out.append(_request(server, "POST", "/v1/completions", body)[0])
                continue
            out.append(_request(server, "POST", "/v1/chat/completions", body)[0])
        return out

    with ThreadPoolExecutor(8) as pool:
        statuses = Counter(s for result in pool.map(client, range(8)) for s in result)
    report(
        "requests under load (8 clients x 5, live server)", ", ".join(f"{n} x {s}" for s, n in sorted(statuses.items()))
    )
    assert statuses == Counter({200: 39, 400: 1})


def test_ayar_serve_of_a_run_works_as_an_rlaif_judge(server):
    """The feedback client against ayar's own server: it refuses logprobs (400), so the client asks again
    without them and keeps going; the tiny model's free text is an answer (ask), and its choice is a letter or a
    counted skip (choose), never a crash."""
    from ayar.infer.feedback import EndpointFeedback, Skipped

    judge = EndpointFeedback(f"http://127.0.0.1:{server}/v1", "tuned", retries=1, backoff=0.01)
    assert isinstance(judge.ask("What is 2 plus 2?", 8), str)
    try:
        choice = judge.choose("Which is better?\nOptions:\n(A) four\n(B) five\n\nAnswer with one letter, A or B.")
        assert choice.letter in "AB" and choice.p_a is None
    except Skipped as e:
        assert e.kind == "malformed"
    assert judge.logprobs is False  # learned from the server's 400
    judge.close()
