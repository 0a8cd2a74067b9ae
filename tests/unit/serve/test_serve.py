"""`ayar serve`: every route, error and limit, on a tiny trained run (TestClient), plus the openai client
against a live server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from ayar.netutil import free_port
from ayar.serve.app import create_app
from ayar.serve.auth import KeyRing, RateLimiter, hash_key
from ayar.serve.backend import BASE, HFBackend, Row, Sampling
from ayar.serve.cache import ResponseCache
from ayar.serve.personalize import personalize
from ayar.serve.routing import choose, parse_alias
from ayar.serve.scheduler import Job, QueueFull, Scheduler
from ayar.serve.settings import ServeSettings
from ayar.serve.store import Store

Q = [{"role": "user", "content": "What is 12 plus 30?"}]


@pytest.fixture(scope="module")
def backend(tiny_run):
    from ayar.infer.load import load_engine

    b = HFBackend(load_engine(tiny_run, log=lambda *_: None), "tuned")
    b.load_adapter("second", tiny_run)
    torch.manual_seed(0)
    for name, p in b.model.named_parameters():  # a strong second adapter, so its answers differ from the base's
        if ".lora_B.second." in name:
            p.data.normal_(0, 0.5)
    return b


def client(backend, tmp_path, **settings) -> TestClient:
    s = ServeSettings(source="unused", db=f"sqlite:///{tmp_path / 'users.db'}", **settings)
    return TestClient(create_app(s, backend=backend))


def chat(c, model="tuned", messages=Q, **kw):
    return c.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 8, **kw})


def sse(text: str) -> list:
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# --- routes ---------------------------------------------------------------------------------------


def test_health_ready_models(backend, tmp_path):
    with client(backend, tmp_path) as c:
        assert c.get("/health").json() == {"status": "ok"}
        ready = c.get("/ready").json()
        assert ready["status"] == "ready" and ready["models"] == ["base", "tuned", "second"]
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["base", "tuned", "second"]


def test_ready_is_503_until_loaded_and_says_the_load_failed(tmp_path):
    app = create_app(ServeSettings(source=str(tmp_path / "missing"), db=f"sqlite:///{tmp_path / 'u.db'}"))
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        for _ in range(100):
            r = c.get("/ready")
            if "failed" in r.text:
                break
            assert r.status_code == 503
            time.sleep(0.1)
        assert r.status_code == 503 and "the model failed to load" in r.json()["error"]["message"]
        assert "missing" not in r.text and "Error" not in r.text  # the public /ready names no internals
        assert chat(c).status_code == 503


def test_chat_completion_shape_and_stream_matches(backend, tmp_path):
    with client(backend, tmp_path) as c:
        r = chat(c)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tuned"
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert usage["prompt_tokens"] == len(backend.encode_chat(Q))
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > usage["prompt_tokens"]
        # the same request streamed: role first, then content deltas, a finish reason, usage, [DONE]
        r = chat(c, stream=True, stream_options={"include_usage": True})
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = sse(r.text)
        assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
        assert text == choice["message"]["content"]
        assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == choice["finish_reason"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage


def test_completions_with_several_prompts_and_n(backend, tmp_path):
    with client(backend, tmp_path) as c:
        r = c.post(
            "/v1/completions",
            json={"model": "base", "prompt": ["The answer is", "hello"], "max_tokens": 4, "n": 2, "temperature": 0},
        )
        body = r.json()
        assert r.status_code == 200 and body["object"] == "text_completion"
        texts = [ch["text"] for ch in body["choices"]]
        assert [ch["index"] for ch in body["choices"]] == [0, 1, 2, 3]
        assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: n copies agree
        assert body["usage"]["prompt_tokens"] == len(backend.encode_text("The answer is")) + len(
            backend.encode_text("hello")
        )
        streamed = sse(
            c.post(
                "/v1/completions",
                json={"model": "base", "prompt": "The answer is", "max_tokens": 4, "temperature": 0, "stream": True},
            ).text
        )
        assert "".join(ch["choices"][0]["text"] for ch in streamed) == texts[0]


def test_simple_generate_route(backend, tmp_path):
    with client(backend, tmp_path) as c:
        body = c.post("/generate", json={"prompt": "What is 12 plus 30?", "max_tokens": 8, "temperature": 0}).json()
        assert body["status"] == "success" and body["model"] == "tuned" and body["tokens_generated"] >= 1
        assert body["response"] == chat(c, temperature=0).json()["choices"][0]["message"]["content"]


def test_stop_sequence_cuts_the_answer(backend, tmp_path):
    with client(backend, tmp_path) as c:
        full = chat(c, max_tokens=12).json()["choices"][0]["message"]["content"]
        stop = full[3:5]
        assert stop.strip(), f"pick a visible stop string from {full!r}"
        cut = chat(c, max_tokens=12, stop=[stop]).json()["choices"][0]
        assert cut["message"]["content"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
        streamed = sse(chat(c, max_tokens=12, stop=stop, stream=True).text)
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in streamed) == full[: full.index(stop)]


# --- adapters per request -------------------------------------------------------------------------


def test_adapter_per_request_and_mixed_batches(backend, tmp_path):
    with client(backend, tmp_path) as c:
        one_by_one = {
            m: chat(c, m, max_tokens=10).json()["choices"][0]["message"]["content"] for m in ("base", "tuned", "second")
        }
        assert one_by_one["second"] != one_by_one["base"]
        with backend.lock:
            backend.model.set_adapter("second")
            assert backend.engine.generate(Q, max_new_tokens=10, preset="deterministic").text == one_by_one["second"]
            backend.model.set_adapter("default")
        # the base is the model without its adapter
        with backend.model.disable_adapter():
            plain = backend.engine.generate(Q, max_new_tokens=10, preset="deterministic").text
        assert one_by_one["base"] == plain
        # sent together, they share batches across adapters and answer the same
        with ThreadPoolExecutor(6) as pool:
            together = list(
                pool.map(
                    lambda m: chat(c, m, max_tokens=10).json()["choices"][0]["message"]["content"],
                    ["base", "tuned", "second"] * 2,
                )
            )
        assert together == [one_by_one[m] for m in ("base", "tuned", "second")] * 2


def test_admin_loads_and_unloads_adapters(tiny_run, tmp_path):
    from ayar.infer.load import load_engine

    b = HFBackend(load_engine(tiny_run, log=lambda *_: None), "tuned")
    root = tmp_path / "adapters"
    shutil.copytree(tiny_run / "adapter", root / "math")
    (root / "pickled").mkdir()
    shutil.copy(tiny_run / "adapter" / "adapter_config.json", root / "pickled")
    admin = {"Authorization": "Bearer boss"}
    with client(b, tmp_path, adapter_root=str(root), admin_keys=["boss"]) as c:
        assert c.post("/admin/adapters", json={"name": "m", "path": "math"}).status_code == 403  # no admin key
        r = c.post("/admin/adapters", json={"name": "m", "path": "math"}, headers=admin)
        assert r.status_code == 200 and r.json()["adapters"] == ["tuned", "m"]
        assert chat(c, "m").status_code == 200
        assert c.post("/admin/adapters", json={"name": "m", "path": "math"}, headers=admin).status_code == 409
        r = c.post("/admin/adapters", json={"name": "x", "path": "../../etc"}, headers=admin)
        assert r.status_code == 400 and "outside the adapter root" in r.json()["error"]["message"]
        r = c.post("/admin/adapters", json={"name": "x", "path": "pickled"}, headers=admin)
        assert r.status_code == 400 and "only safetensors" in r.json()["error"]["message"]
        assert c.post("/admin/adapters", json={"name": "base", "path": "math"}, headers=admin).status_code == 400
        assert c.post("/admin/adapters", json={"name": "../x", "path": "math"}, headers=admin).status_code == 400
        assert c.delete("/admin/adapters/m", headers=admin).json()["adapters"] == ["tuned"]
        r = chat(c, "m")
        assert r.status_code == 404 and "available: base, tuned" in r.json()["error"]["message"]
        assert c.delete("/admin/adapters/m", headers=admin).status_code == 404
    with client(b, tmp_path) as c:  # no admin keys: admin is off
        assert c.get("/admin/adapters").status_code == 403


# --- validation and errors ------------------------------------------------------------------------


def test_errors_use_the_openai_error_object(backend, tmp_path):
    with client(backend, tmp_path, max_tokens_limit=100, max_body_bytes=50_000) as c:
        r = chat(c, "gpt-4")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "available: base, tuned, second" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "robot", "content": "x"}]})
        err = r.json()["error"]
        assert r.status_code == 400 and err["type"] == "invalid_request_error" and err["param"] == "messages.0.role"
        r = chat(c, temperature=5)
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        r = chat(c, max_tokens=101)
        assert r.status_code == 400 and "over this server's limit of 100" in r.json()["error"]["message"]
        long = [{"role": "user", "content": "word " * 600}]
        r = chat(c, messages=long, max_tokens=100)
        msg = r.json()["error"]["message"]
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "max_tokens is 100" in msg and "context window of 512 tokens" in msg
        r = c.post(
            "/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "word " * 700}]}
        )
        assert (
            r.status_code == 400 and "leaves no room for an answer" in r.json()["error"]["message"]
        )  # found by schemathesis
        assert chat(c, logprobs=True).status_code == 400
        assert chat(c, frequency_penalty=0.5).json()["error"]["param"] == "frequency_penalty"
        assert chat(c, stop=["a", "b", "c", "d", "e"]).status_code == 400
        assert chat(c, user="bad user/id").status_code == 400
        r = c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["message"] == "no route GET /v1/nothing"
        r = c.post(
            "/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "x" * 60_000}]}
        )
        assert r.status_code == 413


def test_api_keys_hashed_and_required_except_health(backend, tmp_path):
    keys = ["s3cret", f"sha256:{hash_key('other')}"]
    with client(backend, tmp_path, api_keys=keys) as c:
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        for route in ("/v1/models", "/metrics"):
            r = c.get(route)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer other"}).status_code == 200
        assert c.get("/metrics", headers={"X-API-Key": "s3cret"}).status_code == 200
    ring = KeyRing(keys)
    assert (
        "s3cret" not in repr(ring.hashes) and ring.check("s3cret") == hash_key("s3cret")[:12] and ring.check("") is None
    )


def test_rate_limit_per_key(backend, tmp_path):
    with client(backend, tmp_path, api_keys=["a", "b"], rate_per_minute=60, rate_burst=2) as c:
        a, b = {"Authorization": "Bearer a"}, {"Authorization": "Bearer b"}
        assert [c.get("/v1/models", headers=a).status_code for _ in range(3)] == [200, 200, 429]
        r = c.get("/v1/models", headers=a)
        assert (
            r.status_code == 429
            and int(r.headers["Retry-After"]) >= 1
            and r.json()["error"]["type"] == "rate_limit_error"
        )
        assert c.get("/v1/models", headers=b).status_code == 200  # another key has its own bucket
    limiter = RateLimiter(per_minute=600, burst=1)  # one every 0.1 s
    assert limiter.take("x") == 0 and 0 < limiter.take("x") <= 0.1


def test_full_queue_answers_429_at_once(backend, tmp_path):
    with client(backend, tmp_path, max_queue=0) as c:
        started = time.perf_counter()
        r = chat(c)
        assert r.status_code == 429 and r.headers["Retry-After"] and time.perf_counter() - started < 5


# --- cache, A/B, metrics --------------------------------------------------------------------------


def test_deterministic_responses_are_cached(backend, tmp_path):
    with client(backend, tmp_path) as c:
        first = chat(c, temperature=0)
        second = chat(c, temperature=0)
        assert first.headers["x-ayar-cache"] == "miss" and second.headers["x-ayar-cache"] == "hit"
        assert first.json()["choices"] == second.json()["choices"] and first.json()["id"] != second.json()["id"]
        assert "x-ayar-cache" not in chat(c, temperature=0.9).headers  # sampled without a seed: not cacheable
        metrics = c.get("/metrics").text
        assert 'ayar_cache_total{result="hit"} 1.0' in metrics and 'ayar_cache_total{result="miss"} 1.0' in metrics
    cache = ResponseCache(size=2, ttl=0.05)
    for k in "abc":
        cache.put(k, {"v": k})
    assert cache.get("a") is None and cache.get("c") == {"v": "c"}  # size bound evicts the oldest
    time.sleep(0.06)
    assert cache.get("c") is None  # expired


def test_seeded_sampling_is_reproducible(backend, tmp_path):
    with client(backend, tmp_path, cache_size=0) as c:
        a = chat(c, temperature=1.0, seed=7, max_tokens=12).json()["choices"][0]["message"]["content"]
        b = chat(c, temperature=1.0, seed=7, max_tokens=12).json()["choices"][0]["message"]["content"]
        assert a == b


def test_ab_alias_is_sticky_per_user_and_counted(backend, tmp_path):
    with client(backend, tmp_path, aliases={"assistant": [("tuned", 1.0), ("second", 1.0)]}) as c:
        assert "assistant" in [m["id"] for m in c.get("/v1/models").json()["data"]]
        seen = {}
        for user in [f"user{i}" for i in range(12)]:
            variants = {chat(c, "assistant", user=user, max_tokens=2).headers["x-ayar-variant"] for _ in range(2)}
            assert len(variants) == 1  # sticky
            seen[user] = variants.pop()
        assert set(seen.values()) == {"tuned", "second"}
        metrics = c.get("/metrics").text
        assert 'ayar_generations_total{model="tuned",variant="tuned"}' in metrics
    assert choose([("a", 1), ("b", 0.0001)], "u") == "a"
    assert parse_alias("x=v1:0.9,v2:0.1") == ("x", [("v1", 0.9), ("v2", 0.1)])
    with pytest.raises(Exception, match="ALIAS=MODEL:WEIGHT"):
        parse_alias("x=v1")


def test_metrics_count_requests_latency_ttft_and_tokens(backend, tmp_path):
    with client(backend, tmp_path) as c:
        chat(c, "base", temperature=0.5)
        chat(c, "nope")
        m = c.get("/metrics").text
        assert 'ayar_requests_total{code="200",route="/v1/chat/completions"} 1.0' in m
        assert 'ayar_requests_total{code="404",route="/v1/chat/completions"} 1.0' in m
        assert 'ayar_time_to_first_token_seconds_count{model="base"} 1.0' in m
        assert 'ayar_request_seconds_count{route="/v1/chat/completions"} 2.0' in m
        assert "ayar_queue_depth 0.0" in m
        tokens = [line for line in m.splitlines() if line.startswith('ayar_generated_tokens_total{model="base"}')]
        assert tokens and float(tokens[0].split()[-1]) >= 1


# --- personalization ------------------------------------------------------------------------------


def test_profile_and_history_shape_the_prompt(backend, tmp_path, monkeypatch):
    seen = []
    real = backend.encode_chat
    monkeypatch.setattr(backend, "encode_chat", lambda msgs: seen.append(msgs) or real(msgs))
    with client(backend, tmp_path, history_turns=1) as c:
        profile = {
            "name": "Ayşe",
            "expertise": "beginner",
            "interests": ["math"],
            "tone": "friendly",
            "language": "Turkish",
        }
        assert c.put("/v1/users/ayse/profile", json=profile).status_code == 200
        assert c.get("/v1/users/ayse/profile").json()["profile"] == profile
        assert c.put("/v1/users/ayse/profile", json={"nmae": "x"}).status_code == 400  # unknown field
        first = chat(c, user="ayse", messages=[{"role": "system", "content": "Be brief."}, *Q]).json()
        system = seen[-1][0]
        assert system["role"] == "system" and system["content"].startswith("Be brief.")
        assert "Ayşe" in system["content"] and "friendly" in system["content"] and "Turkish" in system["content"]
        answer = first["choices"][0]["message"]["content"]
        chat(c, user="ayse", messages=[{"role": "user", "content": "and 2 plus 2?"}])
        # history_turns=1: the last exchange only, before the new question
        assert seen[-1][1:] == [
            *Q,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "and 2 plus 2?"},
        ]
        chat(c, user="ayse", messages=[{"role": "user", "content": "third"}])
        assert seen[-1][1]["content"] == "and 2 plus 2?"
        history = c.get("/v1/users/ayse/history", params={"model": "tuned"}).json()["messages"]
        assert [m["role"] for m in history] == ["user", "assistant"] * 3
        assert c.get("/v1/users/ayse/history", params={"model": "base"}).json()["messages"] == []  # per model
        assert c.delete("/v1/users/ayse/history").json()["deleted_messages"] == 6
        assert c.delete("/v1/users/ayse").json()["deleted"] is True
        assert c.get("/v1/users/ayse/profile").status_code == 404
        assert c.get("/v1/users/a%2F..%2Fb/profile").status_code in (400, 404)


def test_users_are_kept_per_api_key(backend, tmp_path):
    with client(backend, tmp_path, api_keys=["k1", "k2"]) as c:
        c.put("/v1/users/bob/profile", json={"name": "Bob"}, headers={"Authorization": "Bearer k1"})
        assert c.get("/v1/users/bob/profile", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert c.get("/v1/users/bob/profile", headers={"Authorization": "Bearer k2"}).status_code == 404


def test_store_caps_history_per_user_and_model(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.db'}", cap=4)
    for i in range(5):
        store.append("u", "m", [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}])
    store.append("u", "other", [{"role": "user", "content": "x"}])
    assert [m["content"] for m in store.history("u", "m", 100)] == ["q3", "a3", "q4", "a4"]
    assert store.history("u", "other", 100) == [{"role": "user", "content": "x"}]
    assert personalize([{"role": "user", "content": "hi"}], None, []) == [{"role": "user", "content": "hi"}]


# --- scheduler and backend ------------------------------------------------------------------------


class _Recorder:
    """A backend that records which rows join together; each row answers its first prompt token in one step."""

    def __init__(self):
        self.active, self.admitted = [], []

    def admit(self, rows):
        self.admitted.append(len(rows))
        self.active += rows

    def step(self):
        for r in self.active:
            r.on_delta(str(r.prompt_ids[0]))
            r.on_finish("stop", 1)
        self.active = []

    def fail_all(self, rows, message):
        pass


def test_scheduler_admits_waiting_requests_up_to_the_batch_and_bounds_its_queue():
    async def scenario():
        loop = asyncio.get_running_loop()
        rec = _Recorder()
        sched = Scheduler(rec, max_batch=4, max_queue=7)
        jobs = [Job(Sampling(), loop) for _ in range(5)]
        for i, j in enumerate(jobs):
            j.add_row([i], 4, BASE)
        two = Job(Sampling(0.7, 1.0, seed=3), loop)
        for _ in range(2):
            two.add_row([9], 4, BASE)
        big = Job(Sampling(), loop)
        for _ in range(2):
            big.add_row([0], 4, BASE)
        for j in jobs:
            sched.submit(j)
        sched.submit(two)
        with pytest.raises(QueueFull) as full:
            sched.submit(big)  # 7 rows wait; 2 more would pass max_queue
        assert full.value.retry_after >= 1
        sched.start()
        answers = [(await j.events.get())[2] for j in jobs]
        await two.events.get()
        sched.stop()
        return rec.admitted, answers

    admitted, answers = asyncio.run(scenario())
    assert answers == ["0", "1", "2", "3", "4"]
    assert admitted == [4, 3]  # 4 fill the batch; then the 5th and the 2-row request together


def test_rows_joining_a_running_batch_answer_as_if_alone(backend):
    """Continuous batching: rows join mid-generation (shorter and longer prompts, other adapters) and
    leave when done; each row's greedy tokens equal its tokens generated alone."""
    questions = ["What is 12 plus 30?", "hi", "What is 48 plus 24? Answer step by step, please, and explain."]
    models = ["tuned", "base", "second"]
    prompts = [backend.encode_chat([{"role": "user", "content": q}]) for q in questions]
    alone = []
    for p, m in zip(prompts, models):
        row = Row(p, 10, m)
        backend.run([row])
        alone.append(row.ids)
    rows = [Row(p, 10, m) for p, m in zip(prompts, models)]
    backend.admit([rows[0]])
    backend.step()
    backend.step()
    backend.admit([rows[1]])  # a shorter prompt joins
    backend.step()
    backend.admit([rows[2]])  # a longer one: the running rows get padded on the left
    assert len(backend.active) == 3
    while backend.active:
        backend.step()
    assert [r.ids for r in rows] == alone and all(r.finish in ("stop", "length") for r in rows)


def test_seeded_row_samples_the_same_whoever_shares_its_batch(backend):
    p = backend.encode_chat(Q)
    alone = Row(p, 10, "base", sampling=Sampling(1.0, 0.9, seed=11))
    backend.run([alone])
    crowd = [
        Row(p, 10, "base", sampling=Sampling(1.0, 0.9, seed=11)),
        Row(p, 10, "tuned"),
        Row(p, 10, "base", sampling=Sampling(1.3, 1.0, seed=5)),
    ]
    backend.run(crowd)
    assert crowd[0].ids == alone.ids


def test_cancelled_row_stops_generating(backend):
    tokens = []
    rows = [
        Row(backend.encode_chat(Q), 40, "tuned", on_delta=tokens.append, cancelled=lambda: len(tokens) >= 2),
        Row(backend.encode_chat(Q), 6, "base"),
    ]
    backend.run(rows)
    assert rows[0].finish == "cancelled" and len(rows[0].ids) <= 4
    assert rows[1].finish in ("stop", "length") and rows[1].ids


# --- a live server and the openai client -----------------------------------------------------------


@contextlib.contextmanager
def live_server(app):
    """The app under uvicorn on 127.0.0.1 (a free port), in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_openai_client_against_a_live_server(backend, tmp_path):
    import openai

    settings = ServeSettings(source="unused", db=f"sqlite:///{tmp_path / 'u.db'}", api_keys=["key"])
    with live_server(create_app(settings, backend=backend)) as url:
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="key", max_retries=0)
        assert [m.id for m in oa.models.list().data] == ["base", "tuned", "second"]
        reply = oa.chat.completions.create(model="tuned", messages=Q, max_tokens=8, temperature=0)
        text = reply.choices[0].message.content
        assert reply.usage.completion_tokens >= 1
        stream = oa.chat.completions.create(model="tuned", messages=Q, max_tokens=8, temperature=0, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == text
        done = oa.completions.create(model="base", prompt="The answer is", max_tokens=4, temperature=0)
        assert done.choices[0].text is not None
        with pytest.raises(openai.NotFoundError, match="not served here"):
            oa.chat.completions.create(model="nope", messages=Q)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="bad", max_retries=0).models.list()
        with pytest.raises(openai.BadRequestError):
            oa.chat.completions.create(model="base", messages=Q, max_tokens=100_000)


def test_client_disconnect_stops_its_generation(backend, tmp_path, monkeypatch):
    import httpx

    rows = []
    admit, step = backend.admit, backend.step
    monkeypatch.setattr(backend, "admit", lambda new: (rows.extend(new), admit(new))[1])
    monkeypatch.setattr(backend, "step", lambda: (time.sleep(0.02), step())[1])  # ~20 ms a token: 400 take 8 s
    monkeypatch.setattr(backend, "stop_ids", set())  # no early end-of-turn: only the client can stop it
    settings = ServeSettings(source="unused", db=f"sqlite:///{tmp_path / 'u.db'}")
    with live_server(create_app(settings, backend=backend)) as url:
        body = {"model": "base", "messages": Q, "max_tokens": 400, "stream": True}
        with httpx.Client(base_url=url, timeout=30) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # the first piece of text arrived: hang up
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (not rows or rows[0].finish is None):
            time.sleep(0.05)
    assert rows and rows[0].finish == "cancelled" and len(rows[0].ids) < 200


def test_load_64_concurrent_clients_only_429s(backend, tmp_path):
    """64 clients at once, 3 requests each, against a queue of 16 rows: every answer is a 200 or a fast 429."""
    import httpx

    settings = ServeSettings(source="unused", db=f"sqlite:///{tmp_path / 'u.db'}", max_queue=16, cache_size=0)
    codes: list[int] = []
    with live_server(create_app(settings, backend=backend)) as url:

        def client(i: int):
            with httpx.Client(base_url=url, timeout=120) as c:
                for j in range(3):
                    body = {
                        "model": ["base", "tuned", "second"][(i + j) % 3],
                        "max_tokens": 6,
                        "stream": (i + j) % 2 == 0,
                        "messages": [{"role": "user", "content": f"What is {i} plus {j}?"}],
                    }
                    r = c.post("/v1/chat/completions", json=body)
                    codes.append(r.status_code)
                    if r.status_code == 429:
                        assert r.headers["Retry-After"]
                    elif body["stream"]:
                        assert r.text.rstrip().endswith("data: [DONE]")

        with ThreadPoolExecutor(64) as pool:
            list(pool.map(client, range(64)))
        metrics = httpx.get(f"{url}/metrics").text
    assert len(codes) == 192 and set(codes) <= {200, 429} and codes.count(200) >= 16
    assert "ayar_queue_depth 0.0" in metrics


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_settings_and_vllm_command(tiny_run, tmp_path, capsys):
    import argparse

    from ayar.cli import serve as cmd
    from ayar.errors import AyarError

    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nalpha\nsha256:" + hash_key("beta") + "\n")
    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    args = p.parse_args(
        [
            str(tiny_run),
            "--adapter",
            f"v1={tiny_run}",
            "--api-keys",
            str(keys),
            "--alias",
            "assistant=v1:0.9,tuned:0.1",
            "--rate-limit",
            "30",
        ]
    )
    s = cmd.settings_from_args(args)
    assert s.adapters == {"v1": str(tiny_run)} and s.api_keys == ["alpha", f"sha256:{hash_key('beta')}"]
    assert s.aliases == {"assistant": [("v1", 0.9), ("tuned", 0.1)]} and s.rate_per_minute == 30
    line = cmd.vllm_command(s)
    assert line.startswith("vllm serve ") and "--enable-lora --lora-modules" in line
    assert f"v1={tiny_run / 'adapter'}" in line and "--api-key $VLLM_API_KEY" in line
    with pytest.raises(AyarError, match="NAME=PATH"):
        cmd.settings_from_args(p.parse_args([str(tiny_run), "--adapter", "oops"]))


# --- PostgreSQL: replicas share users ------------------------------------------------------------


def test_replicas_share_users_through_postgres(backend, tmp_path):
    import os

    url = os.environ.get("AYAR_TEST_POSTGRES_URL")
    if not url:
        pytest.skip(
            'no PostgreSQL test server: run `eval "$(scripts/test-postgres.sh start)"` (make test does); '
            + os.environ.get("AYAR_TEST_POSTGRES_SKIP", "AYAR_TEST_POSTGRES_URL is not set")
        )
    import psycopg  # noqa: F401

    user = f"u{time.time_ns()}"
    one = TestClient(create_app(ServeSettings(source="unused", db=url), backend=backend))
    two = TestClient(create_app(ServeSettings(source="unused", db=url), backend=backend))
    with one as a, two as b:
        assert a.put(f"/v1/users/{user}/profile", json={"name": "Deniz", "tone": "warm"}).status_code == 200
        assert b.get(f"/v1/users/{user}/profile").json()["profile"] == {
            "name": "Deniz",
            "tone": "warm",
            "interests": [],
        }
        answer = chat(a, user=user).json()["choices"][0]["message"]["content"]
        history = b.get(f"/v1/users/{user}/history", params={"model": "tuned"}).json()["messages"]
        assert history == [Q[0], {"role": "assistant", "content": answer}]
        assert b.delete(f"/v1/users/{user}").json()["deleted"] is True
        assert a.get(f"/v1/users/{user}/profile").status_code == 404


def test_a_vanishing_temperature_samples_the_greedy_tokens(backend):
    """temperature 1.18e-38 (the smallest normal float32, as a fuzzer sent it) divided every logit to +/-inf and
    the softmax gave NaN: "generation failed" for the whole batch. Its limit is greedy decoding."""
    p = backend.encode_chat(Q)
    greedy, tiny = Row(p, 8, "tuned"), Row(p, 8, "tuned", sampling=Sampling(1.175494351e-38, 1.0, seed=1))
    backend.run([greedy])
    backend.run([tiny])
    assert tiny.finish in ("stop", "length") and tiny.ids == greedy.ids


def test_a_bad_row_joining_a_running_batch_fails_alone(backend):
    """A row whose prefill raises (here a token id outside the vocabulary; on main an empty prompt did it) used
    to fail every request being generated. Now rows that arrive together are retried one by one and only the
    bad one fails; rows already running, and good rows that arrived with it, finish with their tokens alone."""

    async def scenario():
        loop = asyncio.get_running_loop()
        sched = Scheduler(backend, max_batch=8, max_queue=16)
        p = backend.encode_chat(Q)
        running = Job(Sampling(), loop)
        running.add_row(p, 12, "tuned")
        sched.submit(running)
        sched.start()
        await running.events.get()  # its first text: it is in the batch
        bad, good = Job(Sampling(), loop), Job(Sampling(), loop)
        bad.add_row([10**6], 12, "tuned")
        good.add_row(p, 12, "base")
        sched.submit(bad)
        sched.submit(good)

        async def outcome(job):
            while True:
                event = await job.events.get()
                if event[0] in ("finish", "error"):
                    return event[0], job.rows[0].ids

        results = [await outcome(j) for j in (running, bad, good)]
        sched.stop()
        return results

    (r_kind, r_ids), (b_kind, _), (g_kind, g_ids) = asyncio.run(scenario())
    alone = {m: Row(backend.encode_chat(Q), 12, m) for m in ("tuned", "base")}
    for row in alone.values():
        backend.run([row])
    assert b_kind == "error"
    assert (r_kind, r_ids) == ("finish", alone["tuned"].ids) and (g_kind, g_ids) == ("finish", alone["base"].ids)


def test_an_empty_prompt_is_refused_before_the_model(backend, tmp_path):
    with client(backend, tmp_path) as c:
        r = c.post("/v1/completions", json={"model": "tuned", "prompt": "", "max_tokens": 4})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]


def test_admin_keys_apart_from_api_keys_open_the_admin_routes(backend, tmp_path):
    """With --admin-keys different from --api-keys (as the shipped Kubernetes secret has them), admin routes
    answered 401: they also demanded an API key. An admin key is its own credential now."""
    with client(backend, tmp_path, api_keys=["user-key"], admin_keys=["admin-key"]) as c:
        assert c.get("/admin/adapters", headers={"Authorization": "Bearer admin-key"}).status_code == 200
        assert c.get("/admin/adapters", headers={"Authorization": "Bearer user-key"}).status_code == 403
        assert c.get("/admin/adapters").status_code == 403
        r = c.post(
            "/v1/chat/completions",
            json={"model": "tuned", "messages": Q, "max_tokens": 4},
            headers={"Authorization": "Bearer admin-key"},
        )
        assert r.status_code == 401  # an admin key is not an API key


def test_a_long_user_id_fits_the_store(backend, tmp_path):
    """User ids near the 128-character limit, behind an API key's prefix, overflowed PostgreSQL's column: a 500
    whose message held SQL. Long ids are stored by their hash now."""
    long_user = "u" * 128
    with client(backend, tmp_path, api_keys=["k"]) as c:
        auth = {"Authorization": "Bearer k"}
        r = c.put(f"/v1/users/{long_user}/profile", json={"name": "Ada"}, headers=auth)
        assert r.status_code == 200, r.text
        assert c.get(f"/v1/users/{long_user}/profile", headers=auth).json()["profile"]["name"] == "Ada"
        state = c.app.state.ayar
        keys = {state.user_key("0123456789ab", u) for u in (long_user, long_user[:-1] + "v", "short")}
        assert len(keys) == 3 and max(map(len, keys)) <= 128  # the column's width, on PostgreSQL too
        r = c.get("/v1/users/nobody/profile", headers=auth)
        assert r.status_code == 404


def test_chunked_bodies_are_held_to_the_size_limit(backend, tmp_path):
    """The body limit applied only to requests with a Content-Length; a chunked body was read whole, and
    parsed before the API key was checked."""
    with client(backend, tmp_path, max_body_bytes=1000, api_keys=["k"]) as c:

        def chunks():
            for _ in range(50):
                yield b"x" * 100

        r = c.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "over the limit of 1000 bytes" in r.json()["error"]["message"]
        small = json.dumps({"model": "tuned", "messages": Q, "max_tokens": 2}).encode()
        r = c.post(
            "/v1/chat/completions",
            content=iter([small[:10], small[10:]]),
            headers={"Content-Type": "application/json", "Authorization": "Bearer k"},
        )
        assert r.status_code == 200, r.text


def test_stop_strings_are_bounded(backend, tmp_path):
    with client(backend, tmp_path) as c:
        assert chat(c, stop="x" * 65).status_code == 400
        assert chat(c, stop=["a", "b", "c", "d", "e"]).status_code == 400
        assert chat(c, stop=["a", "b"]).status_code == 200


def test_an_internal_error_names_no_internals(backend, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("SELECT secret FROM users WHERE password='hunter2'")

    s = ServeSettings(source="unused", db=f"sqlite:///{tmp_path / 'users.db'}")
    with TestClient(create_app(s, backend=backend), raise_server_exceptions=False) as c:
        monkeypatch.setattr(c.app.state.ayar.store, "get_profile", broken)
        r = c.get("/v1/users/ada/profile")
        assert r.status_code == 500 and "incident" in r.json()["error"]["message"]
        assert "SELECT" not in r.text and "hunter2" not in r.text


def test_the_response_cache_is_kept_per_api_key_and_writes_history(backend, tmp_path):
    """A hit told one tenant that another had sent the same prompt, and skipped the user's history."""

    def ask(c, key, **kw):
        body = {"model": "tuned", "messages": Q, "max_tokens": 8, **kw}
        return c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})

    with client(backend, tmp_path, api_keys=["a", "b"], history_turns=0) as c:  # no history in the prompt
        as_a = {"Authorization": "Bearer a"}
        assert ask(c, "a").headers["x-ayar-cache"] == "miss"
        assert ask(c, "b").headers["x-ayar-cache"] == "miss"  # another key: not a hit
        assert ask(c, "a").headers["x-ayar-cache"] == "hit"
        for _ in range(2):
            r = ask(c, "a", user="ada")
        assert r.headers["x-ayar-cache"] == "hit"
        history = c.get("/v1/users/ada/history", params={"model": "tuned"}, headers=as_a).json()["messages"]
        assert [m["role"] for m in history] == ["user", "assistant"] * 2  # the hit was remembered too


def test_an_adapter_reloaded_under_the_same_name_is_not_answered_from_the_cache(tiny_run, tmp_path):
    from ayar.infer.load import load_engine

    b = HFBackend(load_engine(tiny_run, log=lambda *_: None), "tuned")
    root = tmp_path / "adapters"
    shutil.copytree(tiny_run / "adapter", root / "math")
    admin = {"Authorization": "Bearer boss"}
    with client(b, tmp_path, adapter_root=str(root), admin_keys=["boss"]) as c:
        assert c.post("/admin/adapters", json={"name": "m", "path": "math"}, headers=admin).status_code == 200
        assert chat(c, "m").headers["x-ayar-cache"] == "miss"
        assert chat(c, "m").headers["x-ayar-cache"] == "hit"
        assert c.delete("/admin/adapters/m", headers=admin).status_code == 200
        assert c.post("/admin/adapters", json={"name": "m", "path": "math"}, headers=admin).status_code == 200
        assert chat(c, "m").headers["x-ayar-cache"] == "miss"


def test_n_choices_with_a_seed_differ_and_repeat(backend, tmp_path):
    with client(backend, tmp_path) as c:
        runs = [chat(c, temperature=1.5, seed=7, n=4, max_tokens=8, messages=Q).json() for _ in range(2)]
    texts = [[ch["message"]["content"] for ch in r["choices"]] for r in runs]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1  # seeded: repeatable, and not four copies of one


@pytest.mark.parametrize(
    "field",
    [
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"tool_choice": "auto"},
        {"response_format": {"type": "json_object"}},
    ],
)
def test_unsupported_openai_fields_are_refused_not_ignored(backend, tmp_path, field):
    with client(backend, tmp_path) as c:
        r = chat(c, **field)
    assert r.status_code == 400 and next(iter(field)) in r.json()["error"]["message"]


def test_a_request_past_its_deadline_is_cancelled(backend, tmp_path):
    with client(backend, tmp_path, request_timeout=0.0) as c:
        r = chat(c, max_tokens=64)
    assert r.status_code == 504 and "longer than" in r.json()["error"]["message"]
