"""The whole loop on a tiny model with a scripted judge (stub_judge.py): labels follow the judge, order flips
become ties and are dropped, provenance is complete, the output passes lint and trains a DPO adapter, bad
feedback is skipped with its reason, and a killed run resumes without duplicating or losing rows."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import ayar
from ayar.config import load_config
from ayar.config.schema import RlaifConfig
from ayar.errors import ConfigError
from ayar.rlaif.constitution import load_constitution
from ayar.rlaif.loop import run_rlaif
from tests.helpers import write_jsonl
from tests.unit.rlaif.stub_judge import StubJudge

QUESTIONS = [
    "How do I bake bread?",
    "FLIP What is a good name for a cat?",
    "How can I learn to swim?",
    "GARBAGE Tell me about the moon.",
    "What is the capital of France?",
    "BUSY Should I water my plants daily?",
    "DOWN Why is the sky blue?",
    "How do I tie a tie?",
    "What should I cook tonight?",
    "How far is the sun?",
]
QUIET = lambda *_: None  # noqa: E731


@pytest.fixture
def stub():
    judge = StubJudge()
    yield judge
    judge.close()


def prompts_file(tmp_path):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "..."}]} for q in QUESTIONS]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def rlaif_config(tiny_model_dir, tmp_path, stub, out="loop", *overrides):
    train = (
        "{training: {max_steps: 2, batch_size: 4, tracker: none, warmup_ratio: 0}, "
        "data: {val_ratio: 0, lint: warn}, model: {dtype: float32}}"
    )
    return load_config(
        None,
        [
            f"policy={tiny_model_dir}",
            f"prompts={prompts_file(tmp_path)}",
            f"out={tmp_path / out}",
            f"judge.url={stub.url}",
            "judge.backoff=0.01",
            "judge.retries=2",
            "judge.concurrency=3",
            "max_new_tokens=12",
            "batch_size=4",
            f"sft={train}",
            f"dpo={train}",
            *overrides,
        ],
        cls=RlaifConfig,
    )


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_loop_end_to_end_with_a_scripted_judge(tiny_model_dir, tmp_path, stub):
    cfg = rlaif_config(tiny_model_dir, tmp_path, stub)
    state = run_rlaif(cfg, log=QUIET)
    out = tmp_path / "loop"
    assert [s for s in state["steps"]] == ["synthesize", "sft", "label", "dpo"]

    critiques = read(out / "critiques.jsonl")
    assert {r["id"] for r in critiques} == set(range(len(QUESTIONS))) - {6}  # DOWN: skipped after its retries
    assert state["steps"]["synthesize"]["skipped"] == {"server_error": 1}
    names = {p.name for p in load_constitution()}
    assert all(r["revision"].startswith("REVISED") and r["principle"] in names and r["judge"] for r in critiques)
    assert len(read(out / "sft.jsonl")) == len(critiques)

    pairs = read(out / "pairs.jsonl")
    skipped = {r["id"]: r["reason"] for r in read(out / "pairs.skipped.jsonl")}
    assert skipped[1] == "tie" and skipped[3] == "malformed" and skipped[6] == "server_error", skipped
    assert skipped.get(5) in (None, "tie")  # BUSY: answered after two 429s, not skipped as rate-limited
    assert {p["id"] for p in pairs} | set(skipped) == set(range(len(QUESTIONS)))  # nothing lost
    for p in pairs:  # the judge prefers the shorter answer, in both orders
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert len(chosen) < len(rejected), p
        prov = p["provenance"]
        assert prov["principle"] in names and stub.url in prov["judge"] and prov["confidence"] == pytest.approx(0.8)
        assert prov["verdicts"] in (["A", "B"], ["B", "A"])

    assert ayar.lint(out / "pairs.jsonl", model=str(tiny_model_dir)).errors == []
    dpo = json.loads((out / "dpo" / "run.json").read_text())
    assert dpo["stage"] == "dpo" and dpo["status"] == "completed" and (out / "dpo" / "adapter").is_dir()
    assert dpo["model_name"] == str(out / "sft")  # DPO continues from the SFT run

    before = dict(stub.requests)
    again = run_rlaif(cfg, log=QUIET)  # a rerun: every step done, nothing asked again
    assert again["steps"] == state["steps"] and dict(stub.requests) == before


def test_averaging_both_orders_gives_the_same_labels_and_the_same_ties_here(tiny_model_dir, tmp_path, stub):
    """order_rule: average (RLAIF's debiasing) decides by the mean of both orders' probabilities: this judge's
    position-bound answers (FLIP: A with 0.8 either way) average to 0.5 and stay ties; the rest agree."""
    strict = rlaif_config(tiny_model_dir, tmp_path, stub, "strict", "steps=[label]")
    averaged = rlaif_config(tiny_model_dir, tmp_path, stub, "averaged", "steps=[label]", "order_rule=average")
    run_rlaif(strict, log=QUIET)
    run_rlaif(averaged, log=QUIET)
    assert read(tmp_path / "strict" / "pairs.jsonl") == read(tmp_path / "averaged" / "pairs.jsonl")
    ties = [r for r in read(tmp_path / "averaged" / "pairs.skipped.jsonl") if r["reason"] == "tie"]
    assert [r["id"] for r in ties] == [1] and "average to 0.5" in ties[0]["detail"]


def test_a_killed_label_step_resumes_without_duplicating_or_losing_rows(tiny_model_dir, tmp_path, stub):
    whole = rlaif_config(tiny_model_dir, tmp_path, stub, "whole", "steps=[label]")
    run_rlaif(whole, log=QUIET)

    cfg_file = tmp_path / "killed.yaml"
    cfg = rlaif_config(tiny_model_dir, tmp_path, stub, "killed", "steps=[label]")
    import yaml

    cfg_file.write_text(yaml.safe_dump(ayar.config.config_to_dict(cfg)))
    stub.stall_after = stub.requests["compare"] + 9  # a few pairs in, the judge hangs
    proc = subprocess.Popen(
        [sys.executable, "-m", "ayar", "rlaif", str(cfg_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    pairs = tmp_path / "killed" / "pairs.jsonl"
    for _ in range(600):  # bounded: up to 2 minutes
        if pairs.is_file() and len(pairs.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stub.stall_after = None
    written = len(pairs.read_text().splitlines())
    assert 2 <= written < len(QUESTIONS)
    with open(pairs, "a") as f:
        f.write('{"id": 99, "prompt": [{"role": "us')  # a row cut short by the kill

    run_rlaif(cfg, log=QUIET)
    resumed, uninterrupted = read(pairs), read(tmp_path / "whole" / "pairs.jsonl")
    assert sorted(r["id"] for r in resumed) == sorted({r["id"] for r in resumed})  # no duplicates
    assert sorted(resumed, key=lambda r: r["id"]) == sorted(uninterrupted, key=lambda r: r["id"])
    skipped = read(tmp_path / "killed" / "pairs.skipped.jsonl")
    assert sorted(r["id"] for r in skipped) == sorted(r["id"] for r in read(tmp_path / "whole" / "pairs.skipped.jsonl"))


def test_bad_loop_settings_are_config_errors(tiny_model_dir, tmp_path, stub):
    with pytest.raises(ConfigError, match="judge: give either judge.url .* or judge.local"):
        run_rlaif(rlaif_config(tiny_model_dir, tmp_path, stub, "a", "judge.local=default"), log=QUIET)
    with pytest.raises(ConfigError, match="steps: 'ppo' is not one of"):
        rlaif_config(tiny_model_dir, tmp_path, stub, "b", "steps=[synthesize, ppo]")
    run_rlaif(rlaif_config(tiny_model_dir, tmp_path, stub, "c", "steps=[synthesize]", "max_prompts=2"), log=QUIET)
    with pytest.raises(ConfigError, match="holds a loop made with other max_prompts"):
        run_rlaif(rlaif_config(tiny_model_dir, tmp_path, stub, "c", "steps=[synthesize]", "max_prompts=3"), log=QUIET)
    cfg = rlaif_config(tiny_model_dir, tmp_path, stub, "c", "steps=[sft]", "max_prompts=2")
    cfg.sft = {"model": {"name": "other"}}
    with pytest.raises(ConfigError, match="sft.model.name: set by the rlaif loop"):
        run_rlaif(cfg, log=QUIET)


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("principles: []", "expected `principles:`"),
        ("principles:\n  - {name: a, critique: c, revision: r}", r"principles\[0\].comparison must be a non-empty"),
        (
            "principles:\n  - {name: a, critique: c, revision: r, comparison: q}\n"
            "  - {name: a, critique: c, revision: r, comparison: q}",
            r"principles\[1\]: the name 'a' is used twice",
        ),
        (
            "principles:\n  - {name: a, critique: c, revision: r, comparison: q, weight: 2}",
            r"unknown key\(s\) \['weight'\]",
        ),
    ],
)
def test_a_bad_constitution_names_the_file_principle_and_field(tmp_path, text, pattern):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=pattern) as err:
        load_constitution(f)
    assert str(f) in str(err.value)


def test_reward_model_then_grpo_instead_of_dpo(tiny_model_dir, tmp_path, stub):
    """steps: label -> reward -> grpo: a reward model on the AI-labelled pairs, then GRPO with its score as the
    reward (training/grpo_rewards.py `model:RUN`)."""
    train = "{training: {max_steps: 2, batch_size: 4, tracker: none}, data: {val_ratio: 0, lint: warn}}"
    grpo = (
        "{training: {max_steps: 1, batch_size: 4, tracker: none}, data: {val_ratio: 0, lint: warn}, "
        "grpo: {num_generations: 2, max_completion_length: 8}}"
    )
    cfg = rlaif_config(
        tiny_model_dir, tmp_path, stub, "rg", "steps=[label, reward, grpo]", f"reward={train}", f"grpo={grpo}"
    )
    state = run_rlaif(cfg, log=QUIET)
    assert list(state["steps"]) == ["label", "reward", "grpo"]
    out = tmp_path / "rg"
    assert json.loads((out / "reward" / "run.json").read_text())["stage"] == "reward"
    grpo_cfg = load_config(out / "grpo" / "config.yaml")
    assert grpo_cfg.stage == "grpo" and grpo_cfg.grpo.rewards == [f"model:{out / 'reward'}"]
    assert (out / "grpo" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_reward_model_scores_what_it_was_trained_to_prefer(tiny_model_dir, tmp_path):
    from ayar.training.dispatch import train
    from ayar.training.grpo_rewards import reward_functions
    from tests.unit.training.test_stages import PAIRS, config

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    run = train(config(tiny_model_dir, data, tmp_path / "runs", "stage=reward", "training.max_steps=30",
                       "training.learning_rate=0.01", "data.val_ratio=0")).path  # fmt: skip
    (score,) = reward_functions([f"model:{run}"], 200)
    prompts = [[{"role": "user", "content": p["prompt"]}] for p in PAIRS]
    chosen = score(prompts, [[{"role": "assistant", "content": p["chosen"]}] for p in PAIRS])
    rejected = score(prompts, [[{"role": "assistant", "content": p["rejected"]}] for p in PAIRS])
    assert len(chosen) == len(PAIRS) and sum(c > r for c, r in zip(chosen, rejected)) >= 0.8 * len(PAIRS)
    with pytest.raises(ConfigError, match="not a finished ayar run directory"):
        reward_functions([f"model:{tmp_path}"], 200)


def test_a_resumed_file_must_belong_to_the_prompts_given_now(tmp_path):
    """The prompts file edited between runs (same path, so the config still matches): the rows already made
    are checked against the prompts given now, and a mismatch stops the step instead of mixing two datasets."""
    from ayar.errors import AyarError
    from ayar.rlaif.rowlog import RowLog

    log = RowLog(tmp_path / "pairs.jsonl")
    first = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    log.add({"id": 0, "prompt": first[0]})
    log.skip(1, first[1], "tie")
    again = RowLog(tmp_path / "pairs.jsonl")
    again.check_prompts(first)  # the same prompts: fine
    assert again.done() == {0, 1}
    with pytest.raises(AyarError, match="row 1 was made for another prompt"):
        again.check_prompts([first[0], [{"role": "user", "content": "changed"}]])
    with pytest.raises(AyarError, match="row 1 was made for another prompt"):
        again.check_prompts(first[:1])
