"""Schemathesis fuzzes every operation of ``core/openapi.json`` against a running mqgate: no request, valid or
not, may get a 500, and every answer must match the document (status, media type, body schema)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

SPEC_PATH = Path(__file__).resolve().parents[2] / "core" / "openapi.json"
schema = schemathesis.openapi.from_path(SPEC_PATH)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
def running(start_broker: Any, tmp_path: Path) -> Any:
    """A running mqgate whose traces go to the test's temporary directory."""
    return start_broker(api={"trace_dir": str(tmp_path)})


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_request_gets_a_server_error_or_an_undocumented_answer(case: Any, running: Any) -> None:
    case.call_and_validate(base_url=running.app.api.url, checks=CHECKS)
