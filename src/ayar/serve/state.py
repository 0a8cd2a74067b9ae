"""What one server holds: the backend and its scheduler, keys, limits, cache, metrics and the user store."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from pathlib import Path

from ayar.errors import AyarError
from ayar.serve.auth import KeyRing, RateLimiter
from ayar.serve.backend import BASE, HFBackend, Sampling, valid_name
from ayar.serve.cache import ResponseCache
from ayar.serve.errors import APIError
from ayar.serve.metrics import Metrics
from ayar.serve.routing import choose
from ayar.serve.scheduler import Scheduler
from ayar.serve.settings import ServeSettings
from ayar.serve.store import Store

log = logging.getLogger("ayar.serve")


def build_backend(settings: ServeSettings, log=print) -> HFBackend:
    """Load the source (run directory or model) and the extra adapters named in the settings."""
    from ayar.infer.exported import ExportedEngine
    from ayar.infer.load import load_engine

    if settings.backend != "transformers":
        from ayar.serve.backend_choice import choose_backend

        choice = choose_backend(settings, log)
        log(f"backend {choice.backend}: {choice.reason}" + (f"\nwarning: {choice.warning}" if choice.warning else ""))
        if choice.source != settings.source:  # served under the run's name, whatever runtime answers
            settings = dataclasses.replace(
                settings, source=choice.source, name=settings.name or Path(settings.source).resolve().name
            )
    engine = load_engine(settings.source, log=log)
    path = Path(settings.source)
    exported = isinstance(engine, ExportedEngine)  # adapters: on a GGUF LoRA export only (its backend says so)
    name = settings.name or (path.resolve().name if (path / "run.json").is_file() or exported else "model")
    backend = backend_for(engine, name, settings.max_batch)
    for adapter, where in settings.adapters.items():
        if not valid_name(adapter):
            raise AyarError(f"--adapter {adapter}=...: name it with letters, digits, '_', '-', '.' (not 'base')")
        backend.load_adapter(adapter, where)
    return backend


def backend_for(engine, name: str, max_batch: int = 8):
    """The serving backend of a loaded engine, by the engine's type: transformers (adapters per row),
    onnxruntime-genai or llama.cpp."""
    from ayar.infer.gguf_engine import GgufEngine
    from ayar.infer.onnx_engine import OnnxEngine
    from ayar.serve.backend_gguf import GgufBackend
    from ayar.serve.backend_onnx import OnnxBackend

    if isinstance(engine, OnnxEngine):
        return OnnxBackend(engine, name)
    if isinstance(engine, GgufEngine):
        return GgufBackend(engine, name, max_batch)  # max_batch rows share one llama.cpp context
    return HFBackend(engine, name)


class ServerState:
    def __init__(self, settings: ServeSettings, backend: HFBackend | None = None):
        from ayar.models.default import ayar_home

        self.settings = settings
        self.keys, self.admin_keys = KeyRing(settings.api_keys), KeyRing(settings.admin_keys)
        self.limiter = RateLimiter(settings.rate_per_minute, settings.rate_burst)
        self.cache = ResponseCache(settings.cache_size, settings.cache_ttl)
        self.metrics = Metrics()
        db = settings.db
        if db is None:
            ayar_home().mkdir(parents=True, exist_ok=True)
            db = f"sqlite:///{ayar_home() / 'serve.db'}"
        self.store = Store(db, cap=settings.history_cap)
        self.backend, self.scheduler = backend, None
        self.load_error: str | None = None
        self.loaded: dict[str, float] = {}
        self.ready = threading.Event()

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model in the background: /health answers at once, /ready says 503 until loaded."""
        if self.backend is not None:
            self._start_scheduler()
            return
        threading.Thread(target=self._load, name="ayar-load", daemon=True).start()

    def _load(self) -> None:
        try:
            self.backend = build_backend(self.settings)
            self._start_scheduler()
        except Exception as e:  # logged here in full; /ready and the generation routes say only that it failed
            log.error("the model failed to load: %s: %s", type(e).__name__, e)
            self.load_error = f"{type(e).__name__}: {e}"

    def _start_scheduler(self) -> None:
        s = self.settings
        self.scheduler = Scheduler(self.backend, s.max_batch, s.max_queue, on_depth=self.metrics.queue.set)
        self.scheduler.start()
        self.ready.set()

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        self.store.close()

    def require_ready(self) -> HFBackend:
        if self.load_error:
            raise APIError(503, "the model failed to load; the server's log says why")
        if not self.ready.is_set():
            raise APIError(503, "the model is still loading", headers={"Retry-After": "5"})
        return self.backend

    def user_key(self, client: str, user: str) -> str:
        """Where a user's profile and history are stored: per API key when there are keys, so one key's
        callers never see another key's users."""
        key = f"{client}/{user}" if self.keys else user
        if len(key) <= 128:  # the store's column width; a longer id is stored by its hash
            return key
        return f"{client}/sha256:{hashlib.sha256(user.encode()).hexdigest()}"

    # --- models -----------------------------------------------------------------------------------
    def loaded_at(self, model: str) -> float:
        """When the adapter served as `model` was (re)loaded: part of the response cache's key."""
        return self.loaded.get(model, 0.0)

    def mark_loaded(self, model: str) -> None:
        self.loaded[model] = time.time()

    def model_names(self) -> list[str]:
        return self.backend.model_names() + list(self.settings.aliases) if self.backend else list(self.settings.aliases)

    def resolve(self, requested: str, sticky: str | None) -> tuple[str, str | None]:
        """(model, A/B variant or None) for a request's `model` field; 404 names what is served."""
        backend = self.require_ready()
        variant = None
        if requested in self.settings.aliases:
            variant = requested = choose(self.settings.aliases[requested], sticky)
        if requested not in backend.model_names():
            raise APIError(
                404,
                f"model {requested!r} is not served here; available: {', '.join(self.model_names())}",
                param="model",
                code="model_not_found",
            )
        return requested, variant

    def default_sampling(self) -> Sampling:
        """The run's own generation settings, for requests that don't set temperature/top_p."""
        from ayar.infer.presets import default_sampling

        return Sampling(*default_sampling(self.backend.engine.generation))


__all__ = ["BASE", "ServerState", "build_backend"]
