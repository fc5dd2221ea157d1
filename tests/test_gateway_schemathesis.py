"""schemathesis against the gateway's own OpenAPI document, served by a gateway in front of the
real mesh: generated requests for every operation (valid and invalid by the schema, with and
without a session token), and not one answer may be a server error. Answers must also match the
document: documented status, content type, and JSON bodies valid against the response schemas.

``CIPHERFEED_GATEWAY_FUZZ_EXAMPLES`` examples per operation and generation mode (default 4 in the suite;
``make gateway-fuzz`` runs 30 per operation and mode: over 1,000 requests).
"""

from __future__ import annotations

import os
import threading

import pytest
import schemathesis
from eth_account import Account
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.routes import build_routes
from tests.test_gateway import mesh, sign_in  # noqa: F401  (the module-scoped gateway fixture)

EXAMPLES = int(os.environ.get("CIPHERFEED_GATEWAY_FUZZ_EXAMPLES", "4"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


class Tally:
    def __init__(self) -> None:
        self.requests = 0
        self.by_status: dict[int, int] = {}
        self._lock = threading.Lock()

    def add(self, status: int) -> None:
        with self._lock:
            self.requests += 1
            self.by_status[status] = self.by_status.get(status, 0) + 1


TALLY = Tally()


@pytest.fixture(scope="module")
def stranger_token(mesh):  # noqa: F811
    """A valid session of an account that owns no key: owner routes get past authentication."""
    return sign_in(mesh.http, Account.create())


def test_generated_requests_get_no_server_error(mesh, stranger_token):  # noqa: F811
    # Driven through hypothesis directly: schemathesis' pytest plugin does not run on pytest 9.
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{mesh.port}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(build_routes())
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def run(case):
                headers = {"Authorization": f"Bearer {stranger_token}"} if TALLY.requests % 2 else None
                response = case.call_and_validate(headers=headers, checks=CHECKS, timeout=60)
                TALLY.add(response.status_code)

            try:
                run()
            except Unsatisfiable:  # no parameter and no body: nothing to make invalid
                assert mode is GenerationMode.NEGATIVE
    print(f"\nschemathesis: {TALLY.requests} requests, by status {dict(sorted(TALLY.by_status.items()))}")
    assert TALLY.requests >= len(operations)
    assert not any(status >= 500 for status in TALLY.by_status)
