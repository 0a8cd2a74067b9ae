"""Reward models (`stage: reward`): a scalar head on the model, trained with TRL's RewardTrainer on
preference pairs (chosen must score above rejected). Accuracy on held-out pairs is measured before and
after training."""

from __future__ import annotations

from ayar.data.render import Renderer
from ayar.models.adapters import for_trainer
from ayar.training.preference import preference_rows
from ayar.training.trl_stage import Stage


def build(cfg, model, tok, splits, args: dict, callbacks):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    renderer = Renderer.from_config(tok, cfg.data)
    data = lambda recs: Dataset.from_list(preference_rows(recs, renderer)) if recs else None
    val = data(splits.val)
    model, lora = for_trainer(model, cfg.method, cfg.lora, task_type="SEQ_CLS")  # peft trains and saves the head too
    config = RewardConfig(
        **{**args, **({} if val else {"eval_strategy": "no"})}, max_length=cfg.data.max_length, disable_dropout=True
    )
    return RewardTrainer(
        model,
        args=config,
        train_dataset=data(splits.train),
        eval_dataset=val,
        processing_class=tok,
        callbacks=callbacks,
        peft_config=lora,
    )


def held_out(cfg, trainer, splits) -> dict:
    """Accuracy (chosen scored above rejected) and mean margin on the validation pairs."""
    if trainer.eval_dataset is None:
        return {}
    m = trainer.evaluate()
    return {"accuracy": m.get("eval_accuracy"), "margin": m.get("eval_margin")}


STAGE = Stage(
    name="reward",
    kinds=("preference",),
    build=build,
    auto_class="AutoModelForSequenceClassification",
    model_kwargs=lambda cfg, splits: {"num_labels": 1},
    before=held_out,
    after=held_out,
)
