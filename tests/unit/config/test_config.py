"""Config loading: YAML + dotted overrides, strict validation with did-you-mean, generated reference."""

import re
from pathlib import Path

import pytest

from ayar.config import load_config
from ayar.config.reference import config_reference
from ayar.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


def test_defaults_and_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "lora.r=32",
            "training.learning_rate=3e-4",
            "lora.target_modules=[q_proj, v_proj]",
            "training.packing=true",
            "data.validation=null",
        ],
    )
    assert cfg.lora.r == 32 and cfg.training.learning_rate == pytest.approx(3e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.training.packing is True and cfg.data.validation is None


def test_unknown_key_names_section_and_suggests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora:\n  rank: 8\ntraining:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "unknown key 'lora.rank' in section 'lora'" in msg and "did you mean 'r'" in msg
    assert "'training.learning_rat'" in msg and "did you mean 'learning_rate'" in msg  # all errors at once
    assert str(f) in msg


def test_unknown_section_and_override():
    with pytest.raises(ConfigError, match=r"unknown key 'trainin' in section 'top level'; did you mean 'training'"):
        load_config(None, ["trainin.max_steps=3"])


def test_wrong_type_names_field_and_value():
    with pytest.raises(ConfigError, match=r"training.batch_size: expected an integer, got 'four'"):
        load_config(None, ["training.batch_size=four"])
    with pytest.raises(ConfigError, match=r"training.packing: expected true/false, got 3"):
        load_config(None, ["training.packing=3"])


def test_choices_are_enforced_with_suggestion():
    with pytest.raises(ConfigError, match=r"model.dtype: 'bfloat61' is not one of .*did you mean 'bfloat16'"):
        load_config(None, ["model.dtype=bfloat61"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["lora.r"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    if "\nhpo:" in path.read_text():  # a training config plus the search `ayar hpo` runs
        from ayar.training.hpo import load_hpo_config

        load_hpo_config(path)
    elif path.read_text().startswith("# RLAIF"):
        from ayar.config import RlaifConfig

        load_config(path, cls=RlaifConfig)
    else:
        load_config(path)


def test_docs_config_reference_is_generated_not_hand_copied():
    page = (ROOT / "docs" / "config.md").read_text()
    m = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", page, re.S)
    assert m, "docs/config.md lacks the generated config reference block"
    assert m.group(1) == config_reference(), "docs/config.md's config reference is stale: run `make docs`"


def test_off_is_a_choice_not_a_boolean():
    # YAML 1.1 reads `off` as false: a field whose choices include "off" takes it as the word
    assert load_config(None, ["training.memory_check=off"]).training.memory_check == "off"


@pytest.mark.parametrize(
    "override, problem",
    [
        ("training.batch_size=0", "training.batch_size: 0 is out of range: it must be >= 1"),
        ("training.logging_steps=0", "training.logging_steps: 0 is out of range: it must be >= 1"),
        ("training.grad_accum=-1", "training.grad_accum: -1 is out of range"),
        ("data.val_ratio=1.0", "data.val_ratio: 1.0 is out of range: it must be >= 0.0 and < 1.0"),
        ("training.warmup_ratio=-0.1", "training.warmup_ratio: -0.1 is out of range"),
        ("lora.dropout=1", "lora.dropout: 1.0 is out of range"),
        ("training.learning_rate=.nan", "training.learning_rate: nan is not a finite number"),
        ("training.learning_rate=0", "training.learning_rate: 0.0 is out of range: it must be > 0.0"),
        ("lora.r=0", "lora.r: 0 is out of range: it must be >= 1"),
    ],
)
def test_values_out_of_range_are_refused_when_the_config_loads(override, problem):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert problem in str(e.value)


@pytest.mark.parametrize(
    "overrides, rule",
    [
        (["stage=dpo", "method=full"], "method: full is supported for stage: sft"),
        (["task=classification", "stage=dpo"], "task: classification trains with stage: sft"),
        (["stage=grpo", "training.batch_size=3"], "must be a multiple of it"),
        (["stage=dpo", "lora.init=pissa"], "lora.init: pissa changes the base weights"),
        (["data.val_ratio=0.5", "data.test_ratio=0.5"], "leave no training rows"),
    ],
)
def test_cross_field_rules_run_in_config_validate(tmp_path, overrides, rule):
    """The rules `ayar train` used to check only once the run started: now `ayar config validate` (and every
    loader of a config) refuses them, before anything loads."""
    from ayar.cli import main

    f = tmp_path / "c.yaml"
    f.write_text("training:\n  max_steps: 1\n")
    with pytest.raises(ConfigError, match=re.escape(rule)):
        load_config(f, overrides)
    assert main(["config", "validate", str(f), *overrides]) == 2


def test_every_example_config_passes_the_cross_field_rules():
    from ayar.config.validate import cross_field_errors

    for path in sorted((ROOT / "examples").glob("*.yaml")):
        if "hpo:" in path.read_text() or path.read_text().startswith("# RLAIF"):
            continue  # not training configs (their training parts are checked above)
        assert cross_field_errors(load_config(path)) == [], path


BOMB = """a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


@pytest.mark.parametrize(
    "text, problem",
    [
        (BOMB, "expand to more than"),  # used to hang, expanding 9^9 values
        ("training: &t\n  extra: *t\n", "an alias refers to the value that contains it"),  # used to be a traceback
        ("training:\n  max_steps: 3\nlora:\n  r: 4\ntraining:\n  max_steps: 9\n", "'training' is given twice"),
        ("lora:\n  r: 4\n  r: 8\n", "'r' is given twice"),
    ],
)
def test_yaml_that_cannot_be_a_config_is_a_clear_error(tmp_path, text, problem):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(problem)) as e:
        load_config(f)
    assert str(f) in str(e.value)


def test_anchors_and_aliases_of_a_normal_size_still_work(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora: &l\n  r: 8\n  alpha: 16\ndata:\n  columns: {instruction: q, output: a}\n")
    assert load_config(f).lora.r == 8
