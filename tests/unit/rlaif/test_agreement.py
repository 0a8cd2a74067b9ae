"""`ayar rlaif agreement`: the judge against human labels, in both orders."""

import json

import pytest

from ayar.cli import main
from ayar.data.dataset import load_records
from ayar.infer.feedback import EndpointFeedback
from ayar.rlaif.agreement import agreement
from ayar.rlaif.constitution import load_constitution
from tests.helpers import write_jsonl
from tests.unit.rlaif.stub_judge import StubJudge

# the stub judge prefers the shorter answer: people chose the shorter one in 3 pairs, the longer in 1
PAIRS = [
    {"prompt": "Greet me.", "chosen": "Hi!", "rejected": "Hello there, how are you doing today?"},
    {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "A banana is a fine fruit."},
    {"prompt": "Say yes.", "chosen": "Yes.", "rejected": "Yes, certainly, absolutely."},
    {"prompt": "Explain rain.", "chosen": "Water vapour condenses into drops that fall.", "rejected": "Clouds."},
    {"prompt": "FLIP Pick one.", "chosen": "One.", "rejected": "The other one."},
    {"prompt": "GARBAGE Anything.", "chosen": "A.", "rejected": "B and more."},
]


@pytest.fixture
def stub():
    judge = StubJudge()
    yield judge
    judge.close()


def test_agreement_position_consistency_and_ties(tmp_path, stub):
    pairs = load_records(str(write_jsonl(tmp_path / "h.jsonl", PAIRS)))
    judge = EndpointFeedback(stub.url, "stub-judge", backoff=0.01, retries=1)
    result = agreement(pairs, judge, load_constitution())
    assert (result["agree"], result["disagree"], result["tie"], result["skipped"]) == (3, 1, 1, 1)
    assert result["agreement"] == pytest.approx(3 / 5) and result["decisive_agreement"] == pytest.approx(3 / 4)
    assert result["position_consistency"] == pytest.approx(4 / 5) and result["tie_rate"] == pytest.approx(1 / 5)
    assert result["first_position_rate"] == pytest.approx(6 / 10)  # the FLIP pair said A twice
    assert result["skipped_reasons"] == {"malformed": 1}
    assert result["mean_p_human"] == pytest.approx((3 * 0.8 + 0.2 + 0.5) / 5)
    assert result["averaged_agreement"] == pytest.approx(3 / 4)  # the FLIP pair averages to 0.5: no verdict


def test_the_command_prints_and_writes_the_report(tmp_path, stub, capsys):
    pairs = write_jsonl(tmp_path / "h.jsonl", PAIRS)
    out = tmp_path / "agreement.json"
    args = ["rlaif", "agreement", "--pairs", str(pairs), "--judge-url", stub.url, "--judge-model", "stub"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "agreement with the human labels   60.0 %" in printed and "tie rate 20.0 %" in printed
    assert json.loads(out.read_text())["judged"] == 5
    assert main(["rlaif", "agreement", "--pairs", str(pairs)]) == 2  # no judge: an error, not a traceback
    assert "give either judge.url" in capsys.readouterr().err
