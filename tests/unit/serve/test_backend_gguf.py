"""The batched llama.cpp backend: rows decoded together in one context give exactly the tokens each gets alone
(and that llama-cpp-python's own generate gives), whatever their prompt lengths, when they join, or how many more
rows than slots there are; seeded sampling does not depend on the company; cancelled rows free their slot."""

from __future__ import annotations

import pytest

from ayar.serve.backend import Row, Sampling

pytest.importorskip("llama_cpp")
PROMPTS = ["What is 7 plus 5?", "hi", "Write one long sentence about the sea and the wind, and the boats on it."]


@pytest.fixture
def engine(gguf_engine):
    return gguf_engine


def rows(engine, n_tokens=12, sampling=Sampling(), prompts=PROMPTS):
    return [Row(engine.prompt_ids([{"role": "user", "content": p}]), n_tokens, sampling=sampling) for p in prompts]


def test_rows_together_equal_rows_alone_and_llama_cpp_own_generate(engine):
    from ayar.serve.backend_gguf import GgufBackend

    backend = GgufBackend(engine, "m", max_batch=4)
    alone = []
    for r in rows(engine):
        backend.run([r])
        alone.append(r.ids)
        expected = [t for t in engine.greedy(r.prompt_ids, 12) if t not in engine.stop_ids]
        assert r.ids == expected
    assert len({len(engine.prompt_ids([{"role": "user", "content": p}])) for p in PROMPTS}) == 3
    together = rows(engine)
    backend.admit(together[:2])
    for _ in range(3):  # the third joins while the first two are decoding
        backend.step()
    backend.admit(together[2:])
    while backend.active:
        backend.step()
    assert [r.ids for r in together] == alone and all(r.finish in ("stop", "length") for r in together)
    assert not backend.slots and all(len(t) > 10 for t in backend.cached.values())  # kept as prompt caches
    cached = dict(backend.cached)
    reused = rows(engine)  # the same prompts again: seated on their cached prefixes, the same answers
    backend.run(reused)
    assert [r.ids for r in reused] == alone and cached


def test_more_rows_than_slots_and_small_prefill_chunks(engine):
    from ayar.serve.backend_gguf import GgufBackend

    expected = []
    for r in rows(engine):
        GgufBackend(engine, "m", max_batch=1).run([r])
        expected.append(r.ids)
    backend = GgufBackend(engine, "m", max_batch=2, prefill_chunk=5)  # prompts fed 5 tokens per step
    many = rows(engine) + rows(engine)
    backend.run(many)
    assert [r.ids for r in many] == expected + expected


def test_seeded_sampling_is_the_same_alone_and_in_company(engine):
    from ayar.serve.backend_gguf import GgufBackend

    backend = GgufBackend(engine, "m", max_batch=3)
    seeded = Sampling(temperature=1.0, top_p=0.9, seed=7)
    alone = rows(engine, 16, seeded, PROMPTS[:1])
    backend.run(alone)
    company = rows(engine, 16, seeded, PROMPTS[:1]) + rows(engine, 16, Sampling(temperature=1.0))
    backend.run(company)
    assert company[0].ids == alone[0].ids and len(alone[0].ids) > 0


def test_a_cancelled_row_leaves_and_its_slot_is_reused(engine):
    from ayar.serve.backend_gguf import GgufBackend

    backend = GgufBackend(engine, "m", max_batch=1)
    stop = {"now": False}
    first = Row(engine.prompt_ids([{"role": "user", "content": "hi"}]), 50, cancelled=lambda: stop["now"])
    second = rows(engine, 6)[0]
    backend.admit([first, second])
    backend.step()
    backend.step()
    stop["now"] = True
    while backend.active:
        backend.step()
    assert first.finish == "cancelled" and second.finish in ("stop", "length")
    again = rows(engine, 6)[0]
    GgufBackend(engine, "m", max_batch=1).run([again])
    assert second.ids == again.ids  # the reused slot held nothing of the cancelled row


def test_a_prompt_longer_than_a_rows_context_fails_alone(engine):
    from ayar.serve.backend_gguf import GgufBackend

    backend = GgufBackend(engine, "m", max_batch=2, slot_context=16)
    long, short = Row(list(range(100, 140)), 4), Row(engine.prompt_ids([{"role": "user", "content": "hi"}])[:10], 4)
    backend.run([long, short])
    assert long.finish == "error" and short.finish in ("stop", "length")
