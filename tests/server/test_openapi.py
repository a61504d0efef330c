"""schemathesis against the served OpenAPI document: generated requests to every route get
no 500 and answers that match the document (status, content type, body schema)."""

from __future__ import annotations

from typing import Any

import schemathesis
from _serve import MASTER, Server
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)


def test_every_route_answers_as_documented(server: Server) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13
    assert "/metrics" in {operation.path for operation in operations}  # (with the master key)
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
        def check(case: Any) -> None:
            if case.path.endswith("/events"):
                case.path_parameters = {"run_id": "no-such-run"}  # (a live stream never ends)
            response = case.call(base_url=server.url,
                                 headers={"Authorization": f"Bearer {MASTER}"}, timeout=30)
            case.validate_response(response, checks=[
                not_a_server_error, status_code_conformance, content_type_conformance,
                response_schema_conformance])

        check()
