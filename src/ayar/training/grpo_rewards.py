"""Reward functions for `stage: grpo`, in TRL's reward-function form: fn(completions, **columns) -> one
float per completion. `completions` are message lists (chat data) or strings (alpaca template); dataset
columns such as `reference` (the row's reference answer) come as keyword arguments."""

from __future__ import annotations

import re

from ayar.metrics.extract import gsm8k_answer as extract_answer
from ayar.plugins import load_callable

_FINAL_LINE = re.compile(r"####\s*-?\$?\s*\d[\d,]*(?:\.\d+)?\s*$")


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else str(completion)


def gsm8k_answer(completions, reference, **_) -> list[float]:
    """1.0 when the answer's number (after `####`, else the last number) equals the reference's, else 0.0."""
    out = []
    for c, ref in zip(completions, reference):
        got, want = extract_answer(_text(c)), extract_answer(ref)
        out.append(1.0 if got is not None and got == want else 0.0)
    return out


def format_reward(completions, **_) -> list[float]:
    """1.0 when the answer ends with a `#### <number>` line (the format GSM8K answers are graded by), else 0.0."""
    return [1.0 if _FINAL_LINE.search(_text(c).strip()) else 0.0 for c in completions]


def length_penalty(target: int):
    """0 up to `target` tokens, then down to -1 at twice the target: discourages rambling."""

    def length(completions, completion_ids=None, **_) -> list[float]:
        sizes = (
            [len(ids) for ids in completion_ids]
            if completion_ids is not None
            else [len(_text(c)) // 4 for c in completions]
        )
        return [-min(1.0, max(0, n - target) / target) for n in sizes]

    length.__name__ = "length"
    return length


def model_reward(run_dir: str):
    """`model:RUN_DIR`: an ayar reward model (a `stage: reward` run) scores each prompt + answer, rendered with
    its chat template as its training rendered pairs; its scalar score is the reward (a learned reward model in
    the loop, e.g. one trained on AI-labelled pairs by `ayar rlaif`)."""
    import json
    from pathlib import Path

    import torch

    from ayar.errors import ConfigError

    run = Path(run_dir)
    meta_file, adapter = run / "run.json", run / "adapter"
    if not meta_file.is_file() or not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"grpo.rewards: model:{run_dir} is not a finished ayar run directory (run.json, adapter/)")
    meta = json.loads(meta_file.read_text())
    if meta.get("stage") != "reward":
        raise ConfigError(f"grpo.rewards: model:{run_dir} is a `stage: {meta.get('stage')}` run, not a reward model")
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = PeftModel.from_pretrained(model, adapter).eval()

    def text(prompt, completion) -> str:
        if isinstance(prompt, str):  # the alpaca template: plain-text prompt and answer
            return prompt + _text(completion)
        answer = completion if isinstance(completion, list) else [{"role": "assistant", "content": str(completion)}]
        return tok.apply_chat_template(list(prompt) + answer, tokenize=False)

    def reward(prompts, completions, **_) -> list[float]:
        texts = [text(p, c) for p, c in zip(prompts, completions)]
        side, tok.padding_side = tok.padding_side, "right"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                return model(**enc).logits[:, 0].float().tolist()
        finally:
            tok.padding_side = side

    reward.__name__ = f"reward_model_{run.name}"
    return reward


def reward_functions(names: list[str], target_length: int) -> list:
    """grpo.rewards -> functions; unknown names are config errors, `module:function` is user code."""
    from ayar.errors import ConfigError

    builtins = {"gsm8k_answer": gsm8k_answer, "format": format_reward, "length": length_penalty(target_length)}
    funcs = []
    for name in names:
        if name in builtins:
            funcs.append(builtins[name])
        elif str(name).startswith("model:"):
            funcs.append(model_reward(str(name).removeprefix("model:")))
        elif ":" in str(name):
            funcs.append(load_callable(name, "grpo.rewards"))
        else:
            raise ConfigError(
                f"grpo.rewards: unknown reward {name!r}; built-ins: {', '.join(builtins)}, "
                "or a function as module:function / file.py:function"
            )
    if not funcs:
        raise ConfigError("grpo.rewards is empty: name at least one reward function")
    return funcs
