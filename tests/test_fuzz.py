"""Property-based fuzzing of every documented route (schemathesis): no 5xx, and every answer matches the document."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from stack import API_KEY

pytestmark = pytest.mark.e2e

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


EXAMPLES_PER_OPERATION = 10


def test_no_server_errors_and_schema_conformance(stack):
    # Driven by hand rather than schemathesis' pytest plugin, whose lazy fixture loader breaks on pytest 9.
    schema = schemathesis.openapi.from_url(stack.base_url.removesuffix("/v1") + "/openapi.json")
    headers = {"Authorization": f"Bearer {API_KEY}", "X-On-Behalf-Of": "fuzzer"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 30
    calls: dict[int, int] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)
        def fuzz(case) -> None:
            response = case.call_and_validate(headers=headers, checks=CHECKS)
            calls[response.status_code] = calls.get(response.status_code, 0) + 1

        fuzz()
    print("fuzz responses by status:", dict(sorted(calls.items())))
    assert sum(calls.values()) >= 3 * len(operations)
    assert not any(status >= 500 for status in calls)

def test_openapi_lists_every_route(stack):
    import httpx

    paths = httpx.get(stack.base_url.removesuffix("/v1") + "/openapi.json").json()["paths"]
    for prefix in ("/v1", "", "/api/v1/llm"):
        assert f"{prefix}/files" in paths and f"{prefix}/files/{{file_id}}/content" in paths
        assert f"{prefix}/batches/{{batch_id}}/cancel" in paths
    assert "/v1/batch" in paths and "/v1/batches/{batch_id}/output" in paths
