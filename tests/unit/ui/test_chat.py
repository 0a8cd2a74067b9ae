"""The Chat tab: two models on one conversation, streamed piece by piece, with the server's profile prompt."""

from __future__ import annotations

import shutil

import pytest

from ayar.errors import AyarError
from ayar.ui import chat
from ayar.ui.workspace import Workspace


def test_both_sides_stream_their_own_greedy_answers(tiny_run, tmp_path):
    ws = Workspace.open(tmp_path)
    shutil.copytree(tiny_run, ws.runs / "r")
    models = chat.Models(ws)
    assert chat.choices(ws) == ["default", chat.BASE, "r"]
    seen = []  # each side's answer as it stood at each yield (the lists are updated in place, as gradio reads them)
    for left, right in chat.stream_pair(
        models, "r", chat.BASE, [], [], "What is 2 plus 3?", preset="deterministic", max_new_tokens=12
    ):
        seen.append(left[-1]["content"])
    assert len(set(seen)) > 2  # the answer grew as it streamed
    assert [m["role"] for m in left] == ["user", "assistant"]
    tuned = models.engine(str(ws.runs / "r")).generate("What is 2 plus 3?", preset="deterministic", max_new_tokens=12)
    base_source = models.source(chat.BASE, "r")
    base = models.engine(base_source).generate("What is 2 plus 3?", preset="deterministic", max_new_tokens=12)
    assert left[-1]["content"] == tuned.text and right[-1]["content"] == base.text
    # a second turn carries the first
    more = list(chat.stream_pair(models, "r", "", left, [], "And 4 plus 4?", preset="deterministic", max_new_tokens=4))
    assert [m["role"] for m in more[-1][0]] == ["user", "assistant", "user", "assistant"] and more[-1][1][-1][
        "role"
    ] == "user"
    with pytest.raises(AyarError, match="needs a run on the other side"):
        models.source(chat.BASE, "default")


def test_the_profile_and_system_prompt_come_first():
    profile = chat.profile_fields("Ada", "", "maths, chess", "friendly", "", "")
    assert profile == {"name": "Ada", "tone": "friendly", "interests": ["maths", "chess"]}
    out = chat.messages([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "Be brief.", profile)
    assert out[0]["role"] == "system" and "Ada" in out[0]["content"] and out[0]["content"].endswith("Be brief.")
    assert out[1] == {"role": "user", "content": "hi"}
    assert chat.messages([{"role": "user", "content": "hi"}], None, None) == [{"role": "user", "content": "hi"}]
