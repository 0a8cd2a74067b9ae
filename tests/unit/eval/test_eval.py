"""Evaluation: metrics against hand-computed values, answer extraction, the overfitting detector, verdicts,
report rendering, the judge's position swap, batched generation, and `ayar eval` end to end on a tiny model."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from ayar.config import EvalConfig
from ayar.errors import AyarError
from ayar.eval.judge import pairwise
from ayar.eval.overfit import overfitting
from ayar.eval.report import verdicts, write_report
from ayar.eval.runner import DIRECTION, EvalResult, evaluate_run
from ayar.metrics import scores as M
from ayar.metrics.extract import gsm8k_answer, last_number, make_extractor, normalize_number
from tests.helpers import MATH_ROWS, write_jsonl

# --- extraction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("The total is $1,000.00.", "1000"),
        ("#### -5", "-5"),
        ("It costs 3.50 dollars", "3.5"),
        ("answer: 7 apples, then 9 pears", "9"),  # no #### line: the last number
        ("#### 12 and later 99", "12"),  # the #### line wins over later numbers
        ("no number here", None),
    ],
)
def test_gsm8k_extraction(text, expected):
    assert gsm8k_answer(text) == expected


def test_other_extractors():
    assert last_number("1, 2, then 3.") == "3" and last_number("none") is None
    assert normalize_number("$2,500") == "2500" and normalize_number("abc") is None
    rx = make_extractor(r"regex:answer is (\w+)")
    assert rx("the answer is Paris. no, the answer is Rome") == "rome" and rx("nothing") is None
    assert make_extractor("regex:answer is ([\\d,]+)")("answer is 1,000") == "1000"
    assert make_extractor("none")("  Hello   World ") == "hello world"
    assert make_extractor("auto", ["x #### 1", "y #### 2"]) is gsm8k_answer
    assert make_extractor("auto", ["plain", "text"])("A b") == "a b"
    with pytest.raises(AyarError, match="not a valid regular expression"):
        make_extractor("regex:(")
    with pytest.raises(AyarError, match="unknown answer extraction 'numbers'"):
        make_extractor("numbers")


# --- metrics by hand ----------------------------------------------------------------------------


def test_exact_match_and_text_metrics():
    em = M.exact_match(["so #### 72", "#### 5", "I don't know"], ["... #### 72", "#### 6", "#### 1"], gsm8k_answer)
    assert em["exact_match"] == pytest.approx(1 / 3) and em["extracted"] == pytest.approx(2 / 3)
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 words of 6 -> P = R = F = 5/6
    assert M.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6)
    assert M.rouge_l(["a b c d"], ["a b c d"]) == 1.0 and M.rouge_l(["x y"], ["a b"]) == 0.0
    assert M.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # n-gram precisions 5/6, 3/5, 1/4, 0/3 (sacrebleu's exp smoothing turns the zero into 1/(2*3)); no brevity penalty
    by_hand = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert M.bleu(["the cat is on the mat"], ["the cat sat on the mat"]) == pytest.approx(by_hand, abs=1e-6)
    assert M.bleu(["completely different words here"], ["the cat sat on the mat"]) < 5


def test_classification_metrics_by_hand():
    preds = ["pos", "pos", "neg", "neg", "pos", "Neg "]
    gold = ["pos", "neg", "neg", "pos", "pos", "neg"]
    c = M.classification(preds, gold)
    # pos: tp 2, fp 1, fn 1 -> P 2/3, R 2/3; neg: tp 2, fp 1, fn 1 -> P 2/3, R 2/3
    assert c["accuracy"] == pytest.approx(4 / 6)
    assert c["per_class"]["pos"]["precision"] == pytest.approx(2 / 3) and c["per_class"]["neg"][
        "recall"
    ] == pytest.approx(2 / 3)
    assert c["f1_macro"] == pytest.approx(2 / 3) and c["per_class"]["pos"]["support"] == 3
    skew = M.classification(["a", "a", "a"], ["a", "a", "b"])
    # a: P 2/3 R 1 F 0.8; b: P 0 R 0 F 0 -> macro F1 0.4
    assert skew["f1_macro"] == pytest.approx(0.4) and skew["recall_macro"] == pytest.approx(0.5)


def test_perplexity_preference_and_generation_stats():
    assert M.perplexity(math.log(4.0)) == pytest.approx(4.0) and M.perplexity(None) is None
    p = M.preference([-1.0, -5.0, -2.0], [-3.0, -4.0, -2.5])
    assert p["preference_accuracy"] == pytest.approx(2 / 3) and p["reward_margin"] == pytest.approx((2 - 1 + 0.5) / 3)
    # pair 1: chosen +1, rejected -1 -> +2; pair 2: chosen -1, rejected 0 -> -1; pair 3: both +0.5 -> 0 (not a win)
    shift = M.preference_shift([0.0, -6.0, -1.5], [-4.0, -4.0, -2.0], [-1.0, -5.0, -2.0], [-3.0, -4.0, -2.5])
    assert shift == {"implicit_accuracy": pytest.approx(1 / 3), "implicit_margin": pytest.approx((2 - 1 + 0) / 3)}
    g = M.generation_stats([10, 30, 20], [True, False, True], seconds=2.0)
    assert g == {"mean_new_tokens": 20.0, "stop_rate": pytest.approx(2 / 3), "tokens_per_s": 30.0}


# --- overfitting on synthetic curves ------------------------------------------------------------


def curves(train, evals, every=2):
    recs = [{"step": i + 1, "loss": v} for i, v in enumerate(train)]
    recs += [{"step": every * (i + 1), "eval_loss": v} for i, v in enumerate(evals)]
    return recs


def test_overfitting_detector():
    falling = [2.0 - 0.1 * i for i in range(12)]
    ok = overfitting(curves(falling, [1.9, 1.7, 1.5, 1.4, 1.35, 1.3]))
    assert ok["status"] == "none"
    bad = overfitting(curves(falling, [1.9, 1.6, 1.5, 1.55, 1.7, 1.9]))
    assert bad["status"] == "overfitting" and bad["turn_step"] == 6 and not bad["caught_by_early_stopping"]
    assert "overfitting from step 6" in bad["message"] and "early_stopping_patience is 0" in bad["message"]
    caught = overfitting(curves(falling, [1.9, 1.6, 1.5, 1.55, 1.7, 1.9]), patience=2, best_step_kept=6)
    assert caught["caught_by_early_stopping"] and "early stopping caught it" in caught["message"]
    rising_train = [1.0 + 0.1 * i for i in range(12)]
    assert overfitting(curves(rising_train, [1.9, 1.6, 1.5, 1.55, 1.7, 1.9]))["status"] == "eval_rose"
    assert overfitting(curves(falling, [1.0, 0.9]))["status"] == "unknown"
    noise = overfitting(curves(falling, [1.9, 1.6, 1.5, 1.505, 1.5, 1.49]))  # within tolerance: not a turn
    assert noise["status"] == "none"


# --- verdicts and report ------------------------------------------------------------------------


def test_verdicts():
    base = {"exact_match": 0.2, "perplexity": 5.0, "stop_rate": 0.5}
    assert verdicts({"exact_match": 0.4, "perplexity": 4.0, "stop_rate": 0.5}, base, DIRECTION) == {
        "overall": "better",
        "per_metric": {"exact_match": "better", "perplexity": "better", "stop_rate": "same"},
    }
    assert verdicts({"exact_match": 0.4, "perplexity": 6.0, "stop_rate": 0.5}, base, DIRECTION)["overall"] == "mixed"
    assert verdicts({"exact_match": 0.1, "perplexity": 6.0, "stop_rate": 0.2}, base, DIRECTION)["overall"] == "worse"


def test_report_rendering(tmp_path):
    r = EvalResult(
        models={
            "tuned": {"exact_match": 0.5, "stop_rate": 1.0, "perplexity": 3.0},
            "base": {"exact_match": 0.25, "stop_rate": 0.5, "perplexity": 4.0},
        },
        samples=[{"prompt": "2 < 3?", "reference": "yes", "tuned": "yes <b>", "base": "maybe"}],
        checks={"forgetting": {"message": "no forgetting flagged: anchor perplexity 9.00 -> 9.10 (+1.1%)"}},
        info={"data": "d.jsonl", "rows": 4, "max_new_tokens": 64, "batch_size": 2, "run": None, "model": "m"},
    )
    r.verdict = verdicts(r.models["tuned"], r.models["base"], DIRECTION)
    out = write_report(r, tmp_path / "eval")
    md = (out / "report.md").read_text()
    assert "| exact match | 0.5000 | 0.2500 | better |" in md and "verdict: BETTER" in md
    assert "no forgetting flagged" in md and "**tuned:** yes <b>" in md
    page = (out / "report.html").read_text()
    assert "yes &lt;b&gt;" in page and "<td>exact match</td>" in page and (out / "metrics.png").stat().st_size > 1000
    assert json.loads((out / "metrics.json").read_text())["verdict"]["overall"] == "better"


# --- judge --------------------------------------------------------------------------------------


def judge_server(choose):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            a = prompt.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
            b = prompt.split("Answer B:\n")[1].split("\n\nReply with")[0]
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": choose(a, b)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/v1"


def test_judge_position_swap_removes_order_bias():
    server, url = judge_server(lambda a, b: "A")  # always prefers the first answer
    try:
        r = pairwise(["q1", "q2"], ["long tuned answer", "x"], ["base", "longer base answer"], url, "judge")
        assert (r["win_rate"], r["loss_rate"], r["tie_rate"]) == (0, 0, 1.0)
    finally:
        server.shutdown()
    server, url = judge_server(lambda a, b: "A" if len(a) > len(b) else "B")  # prefers the longer answer
    try:
        r = pairwise(["q1", "q2"], ["long tuned answer", "x"], ["base", "longer base answer"], url, "judge")
        assert (r["win_rate"], r["loss_rate"]) == (0.5, 0.5) and r["rows"][0]["winner"] == "tuned"
    finally:
        server.shutdown()
    with pytest.raises(AyarError, match="judge endpoint http://127.0.0.1:9/v1 failed on every pair"):
        pairwise(["q"], ["a"], ["b"], "http://127.0.0.1:9/v1", "judge")


# --- end to end on a tiny model -----------------------------------------------------------------


def test_batched_generation_matches_one_by_one(tiny_run):
    from ayar.infer.load import load_engine

    eng = load_engine(tiny_run, log=lambda *_: None)
    convs = [[{"role": "user", "content": r["instruction"]}] for r in MATH_ROWS[:5]]
    batched = eng.generate_batch(convs, batch_size=3, max_new_tokens=12, preset="deterministic")
    single = [eng.generate(c, max_new_tokens=12, preset="deterministic") for c in convs]
    assert [(b.text, b.new_tokens, b.stopped) for b in batched] == [(s.text, s.new_tokens, s.stopped) for s in single]


def test_eval_run_end_to_end(tiny_run, tmp_path):
    data = write_jsonl(
        tmp_path / "heldout.jsonl",
        [
            {"instruction": "What is 5 plus 5?", "output": "5 + 5 = 10. #### 10"},
            {"instruction": "What is 9 plus 1?", "output": "9 + 1 = 10. #### 10"},
        ],
    )
    r = evaluate_run(
        EvalConfig(run=str(tiny_run), data=str(data), max_new_tokens=8, batch_size=2, anchor="sample:anchor")
    )
    assert set(r.models) == {"tuned", "base"}
    for m in r.models.values():
        assert {
            "exact_match",
            "rouge_l",
            "bleu",
            "perplexity",
            "stop_rate",
            "mean_new_tokens",
            "anchor_perplexity",
        } <= set(m)
    # the base is the same weights with the adapter off: its loss differs from the tuned model's
    assert r.models["tuned"]["mean_loss"] != r.models["base"]["mean_loss"]
    assert r.checks["overfitting"]["status"] in ("none", "overfitting", "eval_rose")
    assert "forgetting" in r.checks and r.verdict["overall"] in ("better", "worse", "mixed", "same")
    assert (tiny_run / "eval" / "report.html").is_file() and (tiny_run / "eval" / "loss.png").is_file()
    default = evaluate_run(EvalConfig(run=str(tiny_run), max_new_tokens=4, anchor=None, out=str(tmp_path / "e2")))
    assert default.info["data"] == "the run's validation split" and "forgetting" not in default.checks


def test_baseline_and_bad_usage(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", MATH_ROWS[:3])
    r = evaluate_run(
        EvalConfig(baseline=str(tiny_model_dir), data=str(data), max_new_tokens=4, out=str(tmp_path / "b"))
    )
    assert list(r.models) == ["baseline"] and r.verdict == {} and (tmp_path / "b" / "report.md").is_file()
    with pytest.raises(AyarError, match="--baseline needs --data"):
        evaluate_run(EvalConfig(baseline=str(tiny_model_dir)))
    with pytest.raises(AyarError, match="give a run directory to evaluate, or --baseline"):
        evaluate_run(EvalConfig())
