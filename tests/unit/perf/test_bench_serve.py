"""`ayar bench serve` on a GGUF: ayar's batched llama.cpp backend and its rows-in-turn version driven by the same
clients, with authentication on; every side reports each level and the ratios are computed (timings are reported,
never asserted). The llama-server side needs its binary and a GGUF, and says so."""

from __future__ import annotations

import pytest

from ayar.errors import AyarError


def test_bench_serve_on_a_gguf_with_the_serial_side(gguf_engine):
    engine = gguf_engine
    from ayar.perf.bench_serve import run_bench

    source = engine.source  # the export file
    result = run_bench(source, (1, 3), 1, 6, 2, ("ayar-gguf", "ayar-serial"), log=lambda *_: None)
    for side in ("ayar-gguf", "ayar-serial"):
        for c in (1, 3):
            m = result["sides"][side][c]
            assert m["errors"] == 0 and m["requests"] == c and m["completion_tokens"] > 0, (side, c, m)
            assert m["ttft_p95"] <= m["latency_p95"] + 1e-9
            assert m["completion_tokens"] <= 6 * c  # the warm-up request before level 1 is not counted
    assert set(result["ratios"]["ayar-gguf/ayar-serial"]) == {1, 3}
    assert "warm-up" in result["method"]


def test_the_llama_server_side_says_what_it_needs(tmp_path):
    from ayar.perf.bench_serve import _llama_server_command, gguf_of

    with pytest.raises(AyarError, match="the llama.cpp sides need a GGUF: `ayar export"):
        gguf_of(str(tmp_path))
    with pytest.raises(AyarError, match="needs --llama-server PATH"):
        _llama_server_command(None, str(tmp_path), 8000, 8)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    command = _llama_server_command("/opt/llama-server", str(tmp_path), 8000, 8)
    assert command[:3] == ["/opt/llama-server", "-m", str(tmp_path / "m.gguf")]
    assert command[command.index("--parallel") + 1] == "8" and command[command.index("--ctx-size") + 1] == "16384"


def test_bench_serve_adapter_sides_alternate_two_adapters(gguf_lora_runs):
    from ayar.perf.bench_serve import lora_of, run_bench

    upper, lower = gguf_lora_runs["upper"], gguf_lora_runs["lower"]
    sides = ("ayar-gguf-lora", "ayar-gguf-2lora")
    result = run_bench(str(upper), (1, 2), 2, 6, 2, sides, log=lambda *_: None, second_adapter=str(lower))
    assert result["sides"]["ayar-gguf-lora"][2]["models"] == ["bench"]  # the run's adapter, unmerged
    assert result["sides"]["ayar-gguf-2lora"][2]["models"] == ["bench", "bench-2"]  # alternating
    for side in sides:
        assert all(m["errors"] == 0 and m["completion_tokens"] > 0 for m in result["sides"][side].values()), side
    assert set(result["ratios"]["ayar-gguf-2lora/ayar-gguf-lora"]) == {1, 2}
    with pytest.raises(AyarError, match="--to gguf --kind lora"):
        lora_of(str(upper.parent))
