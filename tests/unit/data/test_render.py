"""Label masks: prompt tokens are -100, assistant tokens and the end-of-turn/EOS token are trained."""

import pytest

from ayar.data.records import Record as Conversation
from ayar.data.render import IGNORE, Renderer
from ayar.errors import DataError
from tests.helpers import FAMILIES, make_tokenizer

CONV = Conversation(
    [{"role": "user", "content": "What is 12 plus 30?"}, {"role": "assistant", "content": "The answer is 42."}], "mem:1"
)
MULTI = Conversation(
    [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "What is 12 plus 30?"},
        {"role": "assistant", "content": "42"},
    ],
    "mem:2",
)


def trained_text(tok, ex):
    return tok.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE])


def trained_runs(ex):
    runs, cur = [], []
    for t, l in zip(ex.input_ids, ex.labels):
        if l != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_only_assistant_and_end_of_turn_trained(family):
    tok = make_tokenizer(family)
    ex = Renderer(tok).render(CONV)
    text = trained_text(tok, ex)
    assert text.startswith("The answer is 42.")
    end = text.removeprefix("The answer is 42.").strip()
    # The turn's stop token is trained, so the model learns to stop.
    expected_end = {
        "llama": "<|eot_id|>",
        "qwen2": "<|im_end|>",
        "mistral": "</s>",
        "gemma": "<end_of_turn>",
        "phi3": "<|end|>",
    }
    assert end == expected_end[family]
    # Every label equals its input id where trained; the prompt (everything before the answer) is masked.
    assert all(l in (IGNORE, t) for t, l in zip(ex.input_ids, ex.labels))
    first = next(i for i, l in enumerate(ex.labels) if l != IGNORE)
    assert "12 plus 30" in tok.decode(ex.input_ids[:first])


@pytest.mark.parametrize("family", ["qwen2", "llama", "phi3"])
def test_multi_turn_trains_every_assistant_turn(family):
    tok = make_tokenizer(family)
    ex = Renderer(tok).render(MULTI)
    runs = [tok.decode(r) for r in trained_runs(ex)]
    assert len(runs) == 2
    assert runs[0].startswith("hello world") and runs[1].startswith("42")


def test_train_on_prompt_trains_everything_but_nothing_is_padding():
    tok = make_tokenizer("qwen2")
    ex = Renderer(tok, train_on_prompt=True).render(CONV)
    assert all(l != IGNORE for l in ex.labels)


def test_eos_appended_when_template_has_no_end_token():
    tok = make_tokenizer("qwen2")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    ex = Renderer(tok).render(CONV)
    assert trained_text(tok, ex).endswith("The answer is 42.<|im_end|>")


def test_alpaca_template_for_base_models():
    tok = make_tokenizer("llama")
    tok.chat_template = None
    with pytest.raises(DataError, match="data.template: alpaca"):
        Renderer(tok)
    ex = Renderer(tok, template="alpaca").render(CONV)
    prompt_ids = tok(Renderer(tok, template="alpaca").prompt_text(CONV.messages[:1]))["input_ids"]
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids  # training sees exactly the inference prompt
    assert trained_text(tok, ex) == "The answer is 42.<|eot_id|>"
    assert "### Response:" in tok.decode(ex.input_ids)


def test_row_with_nothing_left_to_train_is_an_error_naming_the_row():
    tok = make_tokenizer("qwen2")
    long = Conversation(
        [{"role": "user", "content": "hello world " * 50}, {"role": "assistant", "content": "42"}], "train.jsonl:7"
    )
    with pytest.raises(DataError, match=r"train.jsonl:7: no token .* data.max_length=16"):
        Renderer(tok, max_length=16).render(long)


def test_truncation_is_recorded():
    tok = make_tokenizer("qwen2")
    conv = Conversation(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello world " * 40}], "x:1"
    )
    ex = Renderer(tok, max_length=20).render(conv)
    assert ex.truncated and len(ex.input_ids) == 20 and ex.n_trained > 0


def test_system_prompt_added_when_missing():
    tok = make_tokenizer("qwen2")
    text, _ = Renderer(tok, system_prompt="Be brief.").text_and_spans(CONV)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_template_that_is_not_prefix_stable_is_refused():
    tok = make_tokenizer("qwen2")
    # Renders the last message differently from earlier ones: prefixes don't match the full text.
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match="not prefix-stable"):
        Renderer(tok).render(CONV)
