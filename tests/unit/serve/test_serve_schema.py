"""Schemathesis against the server's own OpenAPI schema: generated requests to every operation must
never get a 5xx; a counter shows how many ran."""

from __future__ import annotations

import pytest
import schemathesis  # a dev dependency: a missing install fails here instead of skipping
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

SENT: list[int] = []  # status codes
EXAMPLES = 100  # per operation (16 operations), plus as many again with a served model name


@pytest.fixture(scope="module")
def api(tiny_run, tmp_path_factory):
    from fastapi.testclient import TestClient

    from ayar.infer.load import load_engine
    from ayar.serve.app import create_app
    from ayar.serve.backend import HFBackend
    from ayar.serve.settings import ServeSettings

    root = tmp_path_factory.mktemp("schema")
    backend = HFBackend(load_engine(tiny_run, log=lambda *_: None), "tuned")
    # small generation budgets keep generated requests cheap; admin on, with a key the tests don't send
    settings = ServeSettings(
        source="unused",
        db=f"sqlite:///{root / 'u.db'}",
        max_tokens_limit=8,
        default_max_tokens=4,
        adapter_root=str(root),
        admin_keys=["admin"],
    )
    app = create_app(settings, backend=backend)
    with TestClient(app):  # runs the lifespan: the scheduler thread serves the generated requests
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_server_errors(api):
    """Each operation gets EXAMPLES generated requests (schemathesis' pytest plugin does not load under
    pytest 9, so its strategies are driven by hypothesis directly)."""
    from hypothesis import given

    failures = []
    for result in api.get_all_operations():
        operation = result.ok()
        strategies = [operation.as_strategy()]
        if operation.method == "post" and operation.path in ("/v1/chat/completions", "/v1/completions", "/generate"):
            # random bodies rarely name a served model: also fuzz the generation path itself
            strategies.append(operation.as_strategy().map(_served_model))
        for strategy in strategies:

            @given(case=strategy)
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
            def run(case):
                response = case.call()
                SENT.append(response.status_code)
                try:
                    case.validate_response(response, checks=[not_a_server_error])
                except Exception as e:  # keep going: report every operation that fails
                    failures.append(f"{operation.method.upper()} {operation.path}: {e}")
                    raise

            try:
                run()
            except Exception:
                pass
    codes = {c: SENT.count(c) for c in sorted(set(SENT))}
    print(f"{len(SENT)} generated requests; status codes: {codes}")
    assert not failures, "\n".join(failures[:5])
    assert len(SENT) >= 1000 and codes.get(200, 0) >= 100, codes


def _served_model(case):
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = ["base", "tuned"][len(str(case.body)) % 2]
    return case
