"""A user's profile as a system message, and their stored history before the new messages."""

from __future__ import annotations


def profile_prompt(profile: dict) -> str:
    lines = []
    if profile.get("name"):
        lines.append(f"You are talking with {profile['name']}.")
    if profile.get("expertise"):
        lines.append(f"Their expertise: {profile['expertise']}; pitch the answer at that level.")
    if profile.get("interests"):
        lines.append(f"Their interests: {', '.join(profile['interests'])}.")
    if profile.get("tone"):
        lines.append(f"Answer in a {profile['tone']} tone.")
    if profile.get("language"):
        lines.append(f"Answer in {profile['language']}.")
    if profile.get("notes"):
        lines.append(f"Notes about them: {profile['notes']}")
    return " ".join(lines)


def personalize(messages: list[dict], profile: dict | None, history: list[dict]) -> list[dict]:
    """[system (request's + profile)] + history + the request's other messages."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    if profile:
        system.append(profile_prompt(profile))
    head = [{"role": "system", "content": "\n\n".join(s for s in system if s)}] if any(system) else []
    return head + history + rest
