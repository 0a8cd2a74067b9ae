"""Test helpers: tiny random models and tokenizers built in memory (no downloads), one per model family, and
small data. Tests import these from here (never from another test file); fixtures live in conftest.py.

Each family gets a small byte-level BPE tokenizer with that family's special tokens and a chat template
of the same shape as the real one (ChatML for Qwen2, [INST] for Mistral, header ids for Llama 3,
<start_of_turn> for Gemma, <|user|>/<|end|> for Phi-3), and a 2-layer random model from its config.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is 12 plus 30? The answer is 42.",
    "Natalia sold 48 clips in April and half as many in May. How many clips did she sell? #### 72",
    "You are a helpful assistant. Please answer the question step by step.",
    "system user assistant model instruction response input output hello world",
] * 4

FAMILIES = {
    "llama": {
        "special": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        "extra": ["<|start_header_id|>", "<|end_header_id|>"],
        "template": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    },
    "qwen2": {
        "special": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "extra": ["<|im_start|>"],
        "template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    },
    "mistral": {
        "special": {"bos_token": "<s>", "eos_token": "</s>"},
        "extra": ["[INST]", "[/INST]"],
        "template": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
        "[/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}",
    },
    "gemma": {
        # Like Gemma: EOS is <eos>, but an assistant turn ends with <end_of_turn>.
        "special": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
        "extra": ["<start_of_turn>", "<end_of_turn>"],
        "template": "{{ bos_token }}{% for m in messages %}<start_of_turn>"
        "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    },
    "phi3": {
        # Like Phi-3: EOS is <|endoftext|>, an assistant turn ends with <|end|>.
        "special": {"eos_token": "<|endoftext|>"},
        "extra": ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
        "template": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    },
}


def make_tokenizer(family: str = "qwen2"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    specials = list(dict.fromkeys(list(spec["special"].values()) + spec["extra"]))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=spec["template"], **spec["special"])
    tok.add_special_tokens({"additional_special_tokens": spec["extra"]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def make_model(family: str, tok, seed: int = 0, **overrides):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=False,
        initializer_range=0.5,
    )  # a frozen head of std 0.02 caps the logits: the tiny model could not fit
    cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
    }[family]
    extra = {"head_dim": 8} if family == "gemma" else {}
    config = cls[0](**{**common, **extra, **overrides})
    model = cls[1](config).float()
    stops = [tok.eos_token_id] + [
        tok.convert_tokens_to_ids(t) for t in ("<end_of_turn>", "<|end|>") if t in tok.get_vocab()
    ]
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    return model


def save_tiny(path: Path, family: str = "qwen2", **overrides) -> Path:
    tok = make_tokenizer(family)
    model = make_model(family, tok, **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MATH_ROWS = [
    {"instruction": f"What is {a} plus {b}?", "output": f"{a} + {b} = {a + b}. #### {a + b}"}
    for a, b in [
        (12, 30),
        (7, 5),
        (48, 24),
        (3, 9),
        (10, 10),
        (21, 4),
        (6, 6),
        (15, 27),
        (2, 40),
        (33, 3),
        (1, 1),
        (8, 13),
    ]
]


def run_config(model_dir, data, out, *overrides: str):
    """A training config for a test: the model in fp32, its data and runs folder, no tracker, then `overrides`."""
    from ayar.config import load_config

    base = [f"model.name={model_dir}", "model.dtype=float32", f"data.train={data}", f"output.dir={out}"]
    return load_config(None, [*base, "training.tracker=none", *overrides])


def tiny_train_config(model_dir: Path, data: Path, out: Path, **training):
    return run_config(
        model_dir,
        data,
        out,
        "training.batch_size=4",
        "data.val_ratio=0.2",
        "training.warmup_ratio=0",
        *(f"training.{k}={v}" for k, v in training.items()),
    )


def examples(tok, rows=MATH_ROWS):
    """MATH_ROWS rendered as training examples (a user question, an assistant answer)."""
    from ayar.data.records import Record as Conversation
    from ayar.data.render import Renderer

    r = Renderer(tok, max_length=128)
    return [
        r.render(
            Conversation(
                [{"role": "user", "content": x["instruction"]}, {"role": "assistant", "content": x["output"]}],
                f"mem:{i}",
            )
        )
        for i, x in enumerate(rows)
    ]


def loop_plan(model, tcfg, examples=()):
    """The run plan `ayar train` would make for `model` trained with `tcfg` on CPU in fp32 (training/plan.py),
    for tests that call the loop directly."""
    import dataclasses

    from ayar.config import ModelConfig, TrainConfig
    from ayar.training.plan import decide

    cfg = TrainConfig(
        model=ModelConfig(device="cpu", dtype="float32"), training=dataclasses.replace(tcfg, memory_check="off")
    )
    return decide(cfg).with_passes(cfg, model, list(examples))
