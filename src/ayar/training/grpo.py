"""RL with verifiable rewards (`stage: grpo`) through TRL's GRPOTrainer: for each prompt the model samples
`grpo.num_generations` answers, the reward functions score them, and the policy moves toward the answers
that beat their group's mean. Rows are conversations; the last assistant turn, when there is one, is the
reference answer the rewards compare against (column `reference`)."""

from __future__ import annotations

from ayar.data.render import Renderer
from ayar.models.adapters import for_trainer
from ayar.training.grpo_rewards import reward_functions
from ayar.training.trl_stage import Stage

RENAMES = {"reward": "mean_reward", "eval_reward": "eval_mean_reward"}


def grpo_rows(records, renderer: Renderer) -> list[dict]:
    rows = []
    for rec in records:
        prompt, reference = rec.prompt_and_reference()
        rows.append({"prompt": renderer.trl_prompt(prompt, rec.where), "reference": reference})
    return rows


def build(cfg, model, tok, splits, args: dict, callbacks):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    g = cfg.grpo
    renderer = Renderer.from_config(tok, cfg.data)
    data = lambda recs: Dataset.from_list(grpo_rows(recs, renderer)) if recs else None
    # evaluation batches hold whole groups: keep a multiple of the prompts one batch holds
    per_batch = max(1, cfg.training.batch_size // g.num_generations)
    val = data(splits.val[: len(splits.val) - len(splits.val) % per_batch])
    config = GRPOConfig(
        **{**args, **({} if val else {"eval_strategy": "no"})},
        num_generations=g.num_generations,
        num_generations_eval=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        beta=g.beta,
        log_completions=False,
    )
    model, lora = for_trainer(model, cfg.method, cfg.lora)
    return GRPOTrainer(
        model,
        reward_funcs=reward_functions(g.rewards, g.target_length),
        args=config,
        train_dataset=data(splits.train),
        eval_dataset=val,
        processing_class=tok,
        callbacks=callbacks,
        peft_config=lora,
    )


def held_out(cfg, trainer, splits) -> dict:
    """Mean reward of answers sampled for the validation prompts."""
    if trainer.eval_dataset is None:
        return {}
    m = trainer.evaluate()
    return {"mean_reward": m.get("eval_reward")}


STAGE = Stage(
    name="grpo",
    kinds=("chat", "preference", "classification"),
    build=build,
    before=held_out,
    after=held_out,
    renames=RENAMES,
)
