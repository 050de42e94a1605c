"""The APR server fuzzed from its own OpenAPI schema: no request, however odd, gets a 5xx or
a response its schema does not allow. A bounded number of examples, so it runs in CI."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from apr.decode.engine import STOP, Completion
from apr.serve.app import create_app


class Declining:
    """An engine that ends every thread at once: each solve is a quick, well-formed failure,
    so what is fuzzed is the server's handling of the request, not a model's search."""

    weight_version = "fuzz"

    async def generate(self, prompts, sampling):
        return [Completion("", STOP, None, 1, 1) for _ in prompts]

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(Declining()))


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error_or_an_undocumented_answer(case):
    case.call_and_validate()
