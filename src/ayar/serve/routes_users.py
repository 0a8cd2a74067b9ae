"""Personalization: a user's profile and stored history (`user` in a chat request uses them)."""

from __future__ import annotations

from fastapi import APIRouter, Path, Request

from ayar.serve.errors import APIError
from ayar.serve.schemas import Profile

router = APIRouter(prefix="/v1/users", tags=["users"])
UserId = Path(pattern=r"^[A-Za-z0-9_.@:-]{1,128}$", description="the `user` field of chat requests")


def _key(request: Request, user_id: str) -> str:
    return request.app.state.ayar.user_key(request.state.client, user_id)


@router.put("/{user_id}/profile")
def put_profile(profile: Profile, request: Request, user_id: str = UserId):
    request.app.state.ayar.store.put_profile(_key(request, user_id), profile.model_dump(exclude_none=True))
    return {"user": user_id, "profile": profile.model_dump(exclude_none=True)}


@router.get("/{user_id}/profile")
def get_profile(request: Request, user_id: str = UserId):
    profile = request.app.state.ayar.store.get_profile(_key(request, user_id))
    if profile is None:
        raise APIError(404, f"user {user_id!r} has no profile: create it with PUT /v1/users/{user_id}/profile")
    return {"user": user_id, "profile": profile}


@router.delete("/{user_id}/profile")
def delete_profile(request: Request, user_id: str = UserId):
    return {"user": user_id, "deleted": request.app.state.ayar.store.delete_profile(_key(request, user_id))}


@router.get("/{user_id}/history")
def get_history(request: Request, user_id: str = UserId, model: str | None = None, limit: int = 50):
    state = request.app.state.ayar
    model = model or state.require_ready().default_model
    return {
        "user": user_id,
        "model": model,
        "messages": state.store.history(_key(request, user_id), model, max(1, min(limit, 1000))),
    }


@router.delete("/{user_id}/history")
def delete_history(request: Request, user_id: str = UserId):
    return {"user": user_id, "deleted_messages": request.app.state.ayar.store.delete_history(_key(request, user_id))}


@router.delete("/{user_id}")
def forget_user(request: Request, user_id: str = UserId):
    """Privacy: remove the profile and every stored message of this user."""
    return {"user": user_id, "deleted": request.app.state.ayar.store.delete_user(_key(request, user_id))}
