"""Every alias of config/aliases.py (HF TrainingArguments, peft, TRL, LLaMA-Factory, Axolotl names) lands on our
field with a one-line notice; flat top-level keys go to their section; conflicts are errors."""

from __future__ import annotations

import pytest

from ayar.config import load_config
from ayar.config.aliases import ALIASES
from ayar.errors import ConfigError

# a value each of our fields accepts, and what it must become
VALUES = {
    "training.batch_size": (2, 2),
    "training.grad_accum": (3, 3),
    "training.epochs": (2, 2.0),
    "training.lr_scheduler": ("cosine", "cosine"),
    "training.learning_rate": (1e-4, 1e-4),
    "training.max_grad_norm": (0.5, 0.5),
    "training.warmup_ratio": (0.1, 0.1),
    "training.logging_steps": (5, 5),
    "training.save_steps": (7, 7),
    "training.eval_steps": (9, 9),
    "training.save_total_limit": (4, 4),
    "training.optimizer": ("adamw_bnb_8bit", "adamw_8bit"),
    "training.tracker": (["tensorboard"], "tensorboard"),
    "training.early_stopping_patience": (2, 2),
    "training.run_name": ("exp-1", "exp-1"),
    "training.project": ("my-project", "my-project"),
    "training.gradient_checkpointing": (True, True),
    "training.packing": (True, True),
    "distributed.timeout": (7200, 7200),
    "lora.r": (8, 8),
    "lora.alpha": (4, 4),
    "lora.dropout": (0.1, 0.1),
    "lora.target_modules": (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
    "lora.rslora": (True, True),
    "method": (True, "dora"),
    "data.max_length": (256, 256),
    "model.name": ("/models/x", "/models/x"),
    "model.trust_remote_code": (True, True),
    "output.path": ("/tmp/exact-run", "/tmp/exact-run"),
}
SPECIAL = {"lora_target": ("q_proj, v_proj", ["q_proj", "v_proj"]), "optim": ("adamw_torch", "adamw")}


def _get(cfg, path):
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_every_alias_lands_on_our_field_with_a_notice(alias, tmp_path, capsys):
    path = ALIASES[alias][0]
    given, expected = SPECIAL.get(alias, VALUES[path])
    f = tmp_path / "c.yaml"
    import yaml

    f.write_text(yaml.safe_dump({alias: given}))
    assert _get(load_config(f), path) == expected
    assert f"'{alias}' is ayar's '{path}'" in capsys.readouterr().err
    if "." in path and alias != path.split(".")[-1]:  # inside its section too: `lora: {lora_r: 8}`
        section = path.split(".")[0]
        f.write_text(yaml.safe_dump({section: {alias: given}}))
        assert _get(load_config(f), path) == expected


def test_flat_keys_are_routed_to_their_section():
    cfg = load_config(None, ["learning_rate=3e-4", "r=4", "val_ratio=0.1", "dtype=float32"])
    assert (cfg.training.learning_rate, cfg.lora.r, cfg.data.val_ratio, cfg.model.dtype) == (3e-4, 4, 0.1, "float32")


def test_a_flat_key_two_sections_have_is_refused():
    with pytest.raises(ConfigError, match="could be .* put it in its section"):
        load_config(None, ["name=x"])  # model.name or output.name


def test_alias_and_our_name_differing_is_an_error_and_agreeing_is_fine():
    with pytest.raises(ConfigError, match="'per_device_train_batch_size' \\(2\\) and 'training.batch_size' \\(4\\)"):
        load_config(None, ["per_device_train_batch_size=2", "training.batch_size=4"])
    assert load_config(None, ["per_device_train_batch_size=4", "training.batch_size=4"]).training.batch_size == 4


def test_report_to_takes_several_trackers_and_checks_each():
    assert load_config(None, ["report_to=[wandb, mlflow]"]).training.tracker == ["wandb", "mlflow"]
    assert load_config(None, ["training.tracker=[tensorboard, wandb]"]).training.tracker == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="training.tracker: 'mlfow' is not one of .*did you mean 'mlflow'"):
        load_config(None, ["training.tracker=[tensorboard, mlfow]"])


def test_the_docs_alias_table_is_generated():
    import re
    from pathlib import Path

    from ayar.config.reference import alias_reference

    doc = (Path(__file__).resolve().parents[3] / "docs" / "config-aliases.md").read_text()
    m = re.search(r"<!-- alias-reference:start -->\n(.*?)<!-- alias-reference:end -->", doc, re.S)
    assert m and m.group(1) == alias_reference(), "docs/config-aliases.md is stale: run `make docs`"
