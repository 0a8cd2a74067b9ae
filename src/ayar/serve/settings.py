"""Everything `ayar serve` can be told, in one typed object (`create_app(settings)`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServeSettings:
    source: str = "default"  # run directory, local model directory, or `default`
    # transformers | gguf | onnx | auto (the fastest gated export of a run: serve/backend_choice.py; `ayar serve`'s
    # default)
    backend: str = "transformers"
    name: str | None = None  # public name of the source's adapter (default: the run directory's name)
    adapters: dict[str, str] = field(default_factory=dict)  # extra adapters: name -> run dir / adapter folder
    adapter_root: str | None = None  # admin-loaded adapters must live under this folder
    # security
    api_keys: list[str] = field(default_factory=list)  # raw keys or "sha256:<hex>"; empty = no auth
    admin_keys: list[str] = field(default_factory=list)  # empty = admin routes disabled
    rate_per_minute: float = 0.0  # per API key (or client address without auth); 0 = off
    rate_burst: int = 20
    max_body_bytes: int = 1_000_000
    request_timeout: float = 600.0  # seconds a request may wait and generate before it is cancelled (504)
    # generation
    max_batch: int = 8  # rows decoded together
    max_queue: int = 64  # rows waiting to join the batch; more -> 429
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256
    # response cache for deterministic requests
    cache_size: int = 512
    cache_ttl: float = 600.0
    # personalization
    db: str | None = None  # SQLAlchemy URL; default: sqlite file in $AYAR_HOME
    history_turns: int = 5  # exchanges of stored history put before a request carrying `user`
    history_cap: int = 200  # messages kept per user and model
    # A/B routing: alias -> [(model, weight), ...]
    aliases: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
