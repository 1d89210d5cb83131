"""Schemathesis against the SAM server (issue 14): every operation of /openapi.json fuzzed with
schema-valid and schema-invalid requests, bounded (a fixed number of cases, derandomized, well
under two minutes), against a real process with a token. It checks no 5xx, responses, status
codes and headers as the schema documents them, that what the schema forbids is refused, and
that the token is not ignored.

Marker `schemathesis`; runs in the default suite when schemathesis is installed (dev extra)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import checks  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

pytestmark = [pytest.mark.schemathesis, pytest.mark.timeout(300)]

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = {GenerationMode.POSITIVE: 150, GenerationMode.NEGATIVE: 150}
"""Cases per operation and mode: about 15 s in all (classical backend, one CPU core)."""

CHECKS = [checks.not_a_server_error, checks.status_code_conformance,
          checks.content_type_conformance, checks.response_schema_conformance,
          checks.response_headers_conformance, checks.negative_data_rejection,
          checks.ignored_auth]
"""Not positive_data_acceptance: a schema-valid request may still be refused for what only the
server can see (bytes that are no image, a box outside it), and that is a documented 4xx."""


def test_fuzzed_requests_find_no_5xx_and_no_schema_violation(server_factory) -> None:
    server = server_factory("--token", TOKEN, token=TOKEN)
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=AUTH,
                                           timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    assert labels == ["GET /health", "GET /v1/info", "POST /v1/segment"], labels
    ran: dict[str, int] = {}
    for op in operations:
        for mode, n in MAX_EXAMPLES.items():
            if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
                continue  # no parameters to get wrong

            @settings(max_examples=n, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case) -> None:
                case.call_and_validate(base_url=server.url, headers=AUTH, checks=CHECKS,
                                       timeout=30)
                ran[case.operation.label] = ran.get(case.operation.label, 0) + 1

            run()
    assert ran["POST /v1/segment"] >= 150  # the fuzzing really reached the segment route
    assert server.health().json()["ready"] is True  # and the server is still up
