"""The app factory: `create_app(settings)` -> a FastAPI app (uvicorn runs it; tests use TestClient)."""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ayar.serve.errors import APIError, error_response
from ayar.serve.settings import ServeSettings
from ayar.serve.state import ServerState

PUBLIC = ("/health", "/ready")  # everything else needs an API key when keys are configured


def create_app(settings: ServeSettings | None = None, backend=None) -> FastAPI:
    """`backend`: an already loaded backend (tests, embedding); else the settings' source loads at startup."""
    from ayar.serve import routes_admin, routes_generate, routes_users
    from ayar.version import __version__

    state = ServerState(settings or ServeSettings(), backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        yield
        state.stop()

    app = FastAPI(
        title="ayar",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible API for models fine-tuned with ayar.",
    )
    app.state.ayar = state
    app.add_middleware(_Observe, state=state)
    _error_handlers(app)

    @app.get("/health", tags=["ops"])
    async def health():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"])
    async def ready():
        """Readiness: 503 until the model is loaded (or if loading failed)."""
        state.require_ready()
        return {"status": "ready", "models": state.model_names(), "backend": state.backend.kind}

    @app.get("/metrics", tags=["ops"], dependencies=[Depends(authorize)])
    async def metrics():
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(routes_generate.router, dependencies=[Depends(authorize)])
    app.include_router(routes_users.router, dependencies=[Depends(authorize)])
    # an admin key is its own credential: admin keys need not also be API keys (the shipped Kubernetes secret
    # keeps them apart)
    app.include_router(routes_admin.router, dependencies=[Depends(authorize_admin)])
    return app


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


async def authorize(request: Request) -> str:
    """The caller's id (API key id, or address when the server has no keys), after the rate limit."""
    state: ServerState = request.app.state.ayar
    if state.keys:
        client = state.keys.check(_presented_key(request))
        if client is None:
            raise APIError(
                401, "missing or invalid API key: send `Authorization: Bearer <key>`", code="invalid_api_key"
            )
    else:
        client = request.client.host if request.client else "local"
    wait = state.limiter.take(client)
    if wait > 0:
        raise APIError(
            429,
            f"rate limit of {state.settings.rate_per_minute:g} requests/minute reached; retry in {wait:.1f} s",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, round(wait + 0.5)))},
        )
    request.state.client = client
    return client


async def authorize_admin(request: Request) -> None:
    state: ServerState = request.app.state.ayar
    if not state.admin_keys:
        raise APIError(403, "admin routes are disabled: start the server with --admin-keys FILE")
    admin = state.admin_keys.check(_presented_key(request))
    if admin is None:
        raise APIError(403, "this route needs an admin key", code="not_admin")
    request.state.client = f"admin:{admin}"


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        count = len(e.errors())
        more = f" (and {count - 1} more problem{'s' * (count > 2)})" if count > 1 else ""
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}{more}", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(e.status_code, message, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request, e: Exception):
        # the details (which may hold SQL, paths, internals) go to the server's log, not to the caller
        incident = uuid.uuid4().hex[:12]
        logging.getLogger("ayar.serve").exception(
            "internal error %s on %s %s", incident, request.method, request.url.path
        )
        return error_response(500, f"internal error (incident {incident}; the server's log has the details)")


class _Observe:
    """Counts requests by route template and status, times them, and refuses oversized bodies early."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.state.settings.max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            response = error_response(413, f"request body of {int(length)} bytes is over the limit of {limit} bytes")
            return await response(scope, receive, send)
        if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            # no Content-Length (chunked transfer): read the body here, at most `limit` bytes, before any route,
            # parser or key check sees it; then hand it on as if it had just arrived
            chunks, total, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                chunks.append(message.get("body", b""))
                total += len(chunks[-1])
                if total > limit:
                    response = error_response(413, f"request body is over the limit of {limit} bytes")
                    return await response(scope, receive, send)
                more = message.get("more_body", False)
            body, handed = b"".join(chunks), False

            async def replay():
                nonlocal handed
                if not handed:
                    handed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            receive = replay
        started, status = time.perf_counter(), {"code": 500}

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            m = self.state.metrics
            m.requests.labels(route, str(status["code"])).inc()
            m.latency.labels(route).observe(time.perf_counter() - started)
