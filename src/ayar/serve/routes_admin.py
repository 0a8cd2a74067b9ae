"""Admin: load and unload LoRA adapters while serving (admin key required)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request

from ayar.errors import AyarError
from ayar.serve.backend import valid_name
from ayar.serve.errors import APIError
from ayar.serve.schemas import AdapterLoad

router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/adapters")
def list_adapters(request: Request):
    backend = request.app.state.ayar.require_ready()
    return {"adapters": list(backend.adapters)}


@router.post("/adapters")
def load_adapter(body: AdapterLoad, request: Request):
    state = request.app.state.ayar
    backend = state.require_ready()
    if not valid_name(body.name):
        raise APIError(400, f"adapter name {body.name!r} is reserved or invalid", param="name")
    root = state.settings.adapter_root
    if root is None:
        raise APIError(403, "loading adapters at run time is disabled: start the server with --adapter-root DIR")
    path = (Path(root) / body.path).resolve()
    if not path.is_relative_to(Path(root).resolve()):
        raise APIError(400, f"path {body.path!r} is outside the adapter root", param="path")
    try:
        backend.load_adapter(body.name, path)
    except AyarError as e:
        raise APIError(
            409 if "already loaded" in str(e) else 400,
            str(e).replace(str(Path(root).resolve()), "<root>"),
            param="path",
        )
    state.mark_loaded(body.name)  # answers cached for an earlier adapter of this name are not reused
    return {"loaded": body.name, "adapters": list(backend.adapters)}


@router.delete("/adapters/{name}")
def unload_adapter(name: str, request: Request):
    state = request.app.state.ayar
    backend = state.require_ready()
    try:
        backend.unload_adapter(name)
    except KeyError:
        raise APIError(404, f"no adapter named {name!r}; loaded: {', '.join(backend.adapters) or 'none'}")
    state.mark_loaded(name)
    return {"unloaded": name, "adapters": list(backend.adapters)}
