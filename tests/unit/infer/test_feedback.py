"""The feedback client: what goes wrong with an endpoint is retried, then counted as skipped (never a traceback,
never a wrong label); a wrong URL or key, or a dead endpoint, stops with a clear error."""

import pytest

from ayar.errors import AyarError
from ayar.infer.feedback import EndpointFeedback, EngineFeedback, Skipped, parse_letter
from ayar.netutil import free_port
from tests.unit.rlaif.stub_judge import StubJudge

COMPARE = "Which is better?\nOptions:\n(A) {a}\n(B) {b}\n\nAnswer with one letter, A or B."


@pytest.fixture
def stub():
    judge = StubJudge()
    yield judge
    judge.close()


def judge_at(url, **kw):
    return EndpointFeedback(url, "stub-judge", backoff=0.01, **{"timeout": 2.0, **kw})


def test_a_choice_with_its_probability(stub):
    choice = judge_at(stub.url).choose(COMPARE.format(a="short", b="a longer answer"))
    assert choice.letter == "A" and choice.p_a == pytest.approx(0.8)
    assert judge_at(stub.url).choose(COMPARE.format(a="a longer answer", b="short")).p_a == pytest.approx(0.2)


def test_rate_limits_are_retried_and_errors_become_skips_after_the_retries(stub):
    judge = judge_at(stub.url, retries=3)
    assert judge.choose(COMPARE.format(a="BUSY x", b="a longer answer")).letter == "A"  # two 429s, then answered
    before = stub.requests["compare"]
    with pytest.raises(Skipped) as down:
        judge.choose(COMPARE.format(a="DOWN", b="y"))
    assert down.value.kind == "server_error" and stub.requests["compare"] - before == 4  # 1 + 3 retries
    with pytest.raises(Skipped) as garbage:
        judge.choose(COMPARE.format(a="GARBAGE", b="y"))
    assert garbage.value.kind == "malformed" and "not A or B" in garbage.value.detail
    stub.slow = 1.0
    with pytest.raises(Skipped) as slow:
        judge_at(stub.url, retries=1, timeout=0.2).choose(COMPARE.format(a="SLOW", b="y"))
    assert slow.value.kind == "timeout"


def test_an_endpoint_without_logprobs_is_asked_without_them(tmp_path):
    stub = StubJudge(refuse_logprobs=True)
    try:
        judge = judge_at(stub.url)
        choice = judge.choose(COMPARE.format(a="short", b="a longer answer"))
        assert choice.letter == "A" and choice.p_a is None and judge.logprobs is False
    finally:
        stub.close()


def test_a_wrong_url_or_a_dead_endpoint_stops_with_a_clear_error(stub):
    with pytest.raises(AyarError, match="answered 404 .*check the URL"):
        judge_at(stub.url.replace("/v1", "/nope")).ask("hello", 8)
    port = free_port()  # a port nothing listens on
    dead = judge_at(f"http://127.0.0.1:{port}/v1", retries=0, give_up_after=3)
    for _ in range(2):
        with pytest.raises(Skipped, match="connection"):
            dead.ask("hello", 8)
    with pytest.raises(AyarError, match="failed 3 requests in a row .*is it running"):
        dead.ask("hello", 8)


@pytest.mark.parametrize(
    "text, letter",
    [("A", "A"), ("(B)", "B"), (" b.", "B"), ("Answer: A", "A"), ("Option B is better", "B"), ("AB", None)],
)
def test_parse_letter(text, letter):
    assert parse_letter(text) == letter


def test_a_local_model_chooses_by_the_probabilities_of_a_and_b(tiny_model_dir):
    from ayar.infer.load import load_engine

    judge = EngineFeedback(load_engine(tiny_model_dir, log=lambda *_: None))
    choice = judge.choose(COMPARE.format(a="one", b="two"))
    assert 0 < choice.p_a < 1 and choice.letter == ("A" if choice.p_a >= 0.5 else "B")
    assert judge.ask("Say something.", 6)
