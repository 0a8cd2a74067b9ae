"""Fuzz (hypothesis): the config loader given arbitrary YAML text and arbitrary values per field. The only
allowed outcomes are a config or a ConfigError naming the file or the field: never another exception."""

from __future__ import annotations

import dataclasses
import os
import typing

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ayar.config import TrainConfig, load_config
from ayar.config.loader import apply_overrides, from_dict
from ayar.errors import ConfigError
from tests.reliability import count

EXAMPLES = int(os.environ.get("AYAR_FUZZ_EXAMPLES", "150"))  # make test-reliability: thousands

scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**66), 2**66), st.floats(), st.text(max_size=12))
value = st.recursive(
    scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _fields():
    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub):
            out += [f"{f.name}.{g.name}" for g in dataclasses.fields(sub)]
        else:
            out.append(f.name)
    return out


FIELDS = _fields()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(assignments=st.dictionaries(st.sampled_from(FIELDS), value, min_size=1, max_size=4))
def test_arbitrary_values_per_field(assignments):
    raw = {}
    for key, v in assignments.items():
        section, _, name = key.rpartition(".")
        (raw.setdefault(section, {}) if section else raw)[name] = v
    count("fuzzed configs: values per field")
    try:
        from_dict(TrainConfig, raw, where="fuzz.yaml")
    except ConfigError as e:
        assert "fuzz.yaml" in str(e)


yaml_text = st.one_of(
    st.text(max_size=200),
    st.builds(lambda d: yaml.safe_dump(d, allow_unicode=True), st.dictionaries(st.text(max_size=8), value, max_size=4)),
    st.lists(
        st.sampled_from(
            [
                "training:",
                "  max_steps: 3",
                "lora:",
                "  r: &a 4",
                "  alpha: *a",
                "- x",
                "  - *a",
                "data: {train: [",
                "'",
                '"',
                "!!python/object:os.system",
                "? [a]",
                ": b",
                "&x [*x]",
                "\t",
                "%YAML 1.1",
                "---",
                "...",
            ]
        ),
        max_size=8,
    ).map("\n".join),
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=yaml_text)
def test_arbitrary_yaml_files(tmp_path_factory, text):
    f = tmp_path_factory.mktemp("cfg") / "c.yaml"
    f.write_text(text, encoding="utf-8")
    count("fuzzed configs: YAML files")
    try:
        load_config(f)
    except ConfigError as e:
        assert str(f) in str(e)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(overrides=st.lists(st.text(max_size=30), max_size=3))
def test_arbitrary_overrides(overrides):
    count("fuzzed configs: overrides")
    try:
        load_config(None, overrides)
    except ConfigError:
        pass


def test_apply_overrides_copies():
    raw = {"lora": {"r": 4}}
    assert apply_overrides(raw, ["lora.r=8"])["lora"]["r"] == 8 and raw["lora"]["r"] == 4
