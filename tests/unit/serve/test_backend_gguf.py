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
    assert not backend.slots and all(
        len(t) > 10 and a is None for a, t in backend.cached.values()
    )  # kept as prompt caches
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


def test_adapters_per_request_give_each_row_its_merged_export_answer(gguf_lora_runs):
    """One base GGUF, the runs' GGUF LoRAs applied unmerged by llama.cpp: rows of two adapters and of the base in one
    server give each the greedy answer of that run's merged GGUF export (and the base GGUF's)."""
    from ayar.infer.gguf_engine import GgufEngine
    from ayar.serve.backend_gguf import GgufBackend

    upper, lower = gguf_lora_runs["upper"], gguf_lora_runs["lower"]
    served = GgufEngine(upper / "export" / "gguf-lora-f16")
    backend = GgufBackend(served, "upper", max_batch=4)
    backend.load_adapter("lower", lower)  # a run directory: its gated GGUF LoRA export
    assert backend.model_names() == ["base", "upper", "lower"] and backend.default_model == "upper"
    merged = {
        "upper": GgufEngine(upper / "export" / "gguf-f16"),
        "lower": GgufEngine(lower / "export" / "gguf-f16"),
        "base": GgufEngine(upper / "export" / "gguf-lora-f16" / "model-f16.gguf"),
    }
    prompts = PROMPTS[:2]
    mixed = [Row(served.prompt_ids([{"role": "user", "content": p}]), 10, model=m) for p in prompts for m in merged]
    backend.admit(mixed[:4])
    backend.step()  # the last two join a running batch
    backend.admit(mixed[4:])
    while backend.active:
        backend.step()
    answers = {}
    for r in mixed:
        expected = [t for t in merged[r.model].greedy(r.prompt_ids, 10) if t not in served.stop_ids]
        assert r.ids == expected, r.model
        answers.setdefault(r.model, []).append(r.ids)
    assert len({str(a) for a in answers.values()}) == 3  # the adapters matter: three different answers
    # a slot's prompt cache is reused by rows of its own adapter only: the same rows again give the same answers
    again = [Row(r.prompt_ids, 10, model=r.model) for r in reversed(mixed)]
    backend.run(again)
    assert [r.ids for r in again] == [r.ids for r in reversed(mixed)]


def test_adapter_load_unload_and_refusals(gguf_lora_runs, gguf_engine, tmp_path):
    from ayar.errors import AyarError
    from ayar.infer.gguf_engine import GgufEngine
    from ayar.serve.backend_gguf import GgufBackend

    upper, lower = gguf_lora_runs["upper"], gguf_lora_runs["lower"]
    backend = GgufBackend(GgufEngine(upper / "export" / "gguf-lora-f16"), "upper", max_batch=2)
    backend.load_adapter("lower", lower / "export" / "gguf-lora-f16" / "adapter-f16.gguf")  # the file itself
    with pytest.raises(AyarError, match="already loaded"):
        backend.load_adapter("lower", lower)
    waiting = [Row(backend.engine.prompt_ids([{"role": "user", "content": "hi"}]), 6, model="lower") for _ in range(3)]
    backend.admit(waiting)  # 2 seated, 1 waiting for a slot
    backend.step()
    backend.unload_adapter("lower")
    backend.step()
    assert [r.finish for r in waiting] == ["unloaded"] * 3 and "lower" not in backend.model_names()
    with pytest.raises(AyarError, match="no GGUF LoRA export that passed"):
        backend.load_adapter("x", _run_without_lora(tmp_path))
    with pytest.raises(AyarError, match="merged in"):  # a merged GGUF has no base to put adapters on
        GgufBackend(gguf_engine, "m").load_adapter("lower", lower)


def _run_without_lora(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    return run


def test_rows_take_seats_that_keep_the_batch_in_one_pass_and_feed_in_sequence_order(engine):
    """llama.cpp cuts a batch into one pass per run of consecutive sequence ids (a KV stream per sequence): a new
    row takes the free seat that leaves the fewest runs (the lowest of those, even where another seat's prompt
    cache shares a few more tokens), and tokens are fed in sequence order."""
    from ayar.serve.backend_gguf import GgufBackend

    def seated(leaving: tuple[int, ...], prompts=("a", "b", "c", "d")) -> tuple[GgufBackend, Row]:
        backend = GgufBackend(engine, "m", max_batch=4)
        backend.admit(rows(engine, n_tokens=40, prompts=list(prompts)))
        backend.step()
        assert sorted(s.seq for s in backend.slots) == [0, 1, 2, 3]
        for s in backend.slots:
            if s.seq in leaving:
                s.row.cancelled = lambda: True
        backend.step()
        late = rows(engine, n_tokens=4, prompts=["What is 7 plus 5?"])[0]
        backend.admit([late])
        return backend, late

    # seats 1, 2 busy: 0 and 3 both keep one run; 0, though seat 3's cache shares more of the prompt
    backend, late = seated((0, 3), prompts=("a", "b", "c", "What is 7 plus 3?"))
    assert [s.seq for s in backend.slots if s.row is late] == [0]
    backend._fill(backend.slots)  # seat 0 prefilling, seats 1 and 2 decoding
    seqs = [backend.batch.seq_id[i][0] for i in range(backend.batch.n_tokens)]
    assert seqs == sorted(seqs) and sorted(set(seqs)) == [0, 1, 2] and seqs.count(0) > 1
    # seats 1, 3 busy: seat 2 joins them into one run, seat 0 would leave two
    backend, late = seated((0, 2))
    assert [s.seq for s in backend.slots if s.row is late] == [2]
