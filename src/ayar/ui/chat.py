"""The Chat tab: two models side by side on the same conversation (a run and its base, or two runs), streamed
together, with the generation presets, a system prompt and the server's personalization profile."""

from __future__ import annotations

import threading
from pathlib import Path

from ayar.errors import AyarError
from ayar.ui.workspace import Workspace

BASE = "base of the run"  # the picker's entry for "the model the other side's run started from"


class Models:
    """Engines loaded once per source and kept (loading takes seconds; a chat turn should not)."""

    def __init__(self, ws: Workspace, keep: int = 3):
        self.ws, self.keep = ws, keep
        self._engines: dict[str, object] = {}
        self._lock = threading.Lock()

    def source(self, choice: str, other: str = "") -> str:
        """A picker's value as what load_engine takes: `default`, a run directory, or BASE (the base model of
        the run picked on the other side)."""
        choice = (choice or "").strip()
        if choice == BASE:
            if not other or other in ("default", BASE):
                raise AyarError("chat: `base of the run` needs a run on the other side")
            from ayar.ui.runs import read_meta

            base = read_meta(self.ws.run(other)).get("base_model")
            if not base:
                raise AyarError(f"chat: {other} does not record its base model")
            return base
        if choice in ("", "default"):
            return "default"
        return str(self.ws.run(choice, "chat model"))

    def engine(self, source: str):
        with self._lock:
            if source not in self._engines:
                from ayar import api

                if len(self._engines) >= self.keep:
                    self._engines.pop(next(iter(self._engines)))
                self._engines[source] = api.load(source, log=lambda *_: None)
            return self._engines[source]


def messages(history: list[dict], system: str = "", profile: dict | None = None) -> list[dict]:
    """The conversation as the model gets it: the profile as a system message (as the server builds it),
    then the system prompt, then the turns."""
    from ayar.serve.personalize import profile_prompt

    out = []
    text = "\n".join(t for t in (profile_prompt(profile) if profile else "", (system or "").strip()) if t)
    if text:
        out.append({"role": "system", "content": text})
    return out + [{"role": m["role"], "content": _text(m["content"])} for m in history]


def generation(preset: str, max_new_tokens: int, temperature: float | None = None) -> dict:
    kw = {"preset": preset, "max_new_tokens": int(max_new_tokens)}
    if preset == "creative" and temperature:
        kw["temperature"] = float(temperature)
    return kw


def stream_pair(models: Models, left: str, right: str, history_left, history_right, prompt: str, **settings):
    """Both sides' answers to `prompt`, streamed in turn piece by piece: yields (history_left, history_right)
    with the answers growing. `settings`: system, profile, preset, max_new_tokens, temperature."""
    system, profile = settings.pop("system", ""), settings.pop("profile", None)
    gen = generation(**settings)
    sides = []
    for choice, other, history in ((left, right, history_left), (right, left, history_right)):
        history = [*history, {"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
        if not choice:
            sides.append((history[:-1], None))
            continue
        engine = models.engine(models.source(choice, other))
        sides.append((history, iter(engine.stream(messages(history[:-1], system, profile), **gen))))
    out = [s[0] for s in sides]
    streams = [s[1] for s in sides]
    while any(streams):
        for i, stream in enumerate(streams):
            if stream is None:
                continue
            piece = next(stream, None)
            if piece is None:
                streams[i] = None
                out[i][-1]["content"] = out[i][-1]["content"].strip()
            else:
                out[i][-1]["content"] += piece
        yield out[0], out[1]


def profile_fields(name: str, expertise: str, interests: str, tone: str, language: str, notes: str) -> dict:
    profile = {"name": name, "expertise": expertise, "tone": tone, "language": language, "notes": notes}
    profile = {k: v.strip() for k, v in profile.items() if v and v.strip()}
    if interests and interests.strip():
        profile["interests"] = [s.strip() for s in interests.split(",") if s.strip()]
    return profile


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # gradio's message content parts
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def choices(ws: Workspace) -> list[str]:
    from ayar.ui.runs import read_meta

    done = [p for p in ws.run_dirs() if read_meta(p).get("status") == "completed"]
    return ["default", BASE, *(str(Path(p).relative_to(ws.runs)) for p in done)]
