"""Preference alignment (`stage: dpo`): DPO, IPO, KTO, ORPO and SimPO through TRL.

The model is the base (or the run named in model.name, its adapter merged) plus a new adapter from the one
conversion point; the reference of DPO/IPO/KTO is the same model with the adapter disabled, so no second
copy of the weights is held. Prompts are rendered by the model's chat template with the run's system
prompt, as SFT and chat render them.
"""

from __future__ import annotations

from ayar.data.render import Renderer
from ayar.models.adapters import for_trainer
from ayar.training.trl_stage import Stage

# TRL logs -> metrics.jsonl names (eval_ variants are renamed the same way)
RENAMES = {
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "preference_accuracy",
    "eval_rewards/margins": "eval_reward_margin",
    "eval_rewards/accuracies": "eval_preference_accuracy",
}


def preference_rows(records, renderer: Renderer, kto: bool = False) -> list[dict]:
    """Records -> TRL rows: conversational (prompt/chosen/rejected messages) for chat templates, strings for
    the alpaca template; KTO gets each pair as a liked and a disliked completion."""
    rows = []
    for rec in records:
        prompt = renderer.trl_prompt(rec.messages, rec.where)
        if isinstance(prompt, str):  # alpaca: plain-text completions
            chosen, rejected = rec.chosen[-1]["content"], rec.rejected[-1]["content"]
        else:
            chosen, rejected = rec.chosen, rec.rejected
        if kto:
            rows += [
                {"prompt": prompt, "completion": chosen, "label": True},
                {"prompt": prompt, "completion": rejected, "label": False},
            ]
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def build(cfg, model, tok, splits, args: dict, callbacks):
    from datasets import Dataset

    pref = cfg.preference
    renderer = Renderer.from_config(tok, cfg.data)
    kto = pref.loss == "kto"
    data = lambda recs: Dataset.from_list(preference_rows(recs, renderer, kto)) if recs else None
    train, val = data(splits.train), data(splits.val)
    common = dict(args, beta=pref.beta, max_length=cfg.data.max_length, disable_dropout=True)
    if not val:
        common["eval_strategy"] = "no"
    model, lora = for_trainer(model, cfg.method, cfg.lora)
    kw = dict(
        args=None, train_dataset=train, eval_dataset=val, processing_class=tok, callbacks=callbacks, peft_config=lora
    )
    if pref.loss in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer

        kw["args"] = DPOConfig(**common, loss_type=["sigmoid" if pref.loss == "dpo" else "ipo"])
        return DPOTrainer(model, **kw)
    if kto:
        from trl import KTOConfig, KTOTrainer

        kw["args"] = KTOConfig(**common)
        return KTOTrainer(model, **kw)
    if pref.loss == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        kw["args"] = ORPOConfig(**common)
        return ORPOTrainer(model, **kw)
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    kw["args"] = CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=pref.simpo_gamma)
    return CPOTrainer(model, **kw)


STAGE = Stage(name="dpo", kinds=("preference",), build=build, renames=RENAMES)
