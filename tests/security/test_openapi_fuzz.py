"""schemathesis against the gateway's own OpenAPI: generated requests to every route this stack
serves (datastore, sessions, inference, models) never get a 5xx, and never a byte of the planted
secret. Routes of services this stack does not run (training, active learning, scoring, batch)
would rightly answer 503 here; test_openapi_fuzz_jobs.py fuzzes them on a stack that runs them.

(schemathesis' pytest plugin does not run under pytest 9, so each operation's hypothesis
strategy is driven directly.)"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.fixtures.hostile import Hostile

pytestmark = pytest.mark.timeout(400)

SERVED = r"^/(datastore/(image|label)|session/|infer/\{model\}|model/)"


def test_generated_requests_never_get_a_server_error(hostile: Hostile) -> None:
    schema = schemathesis.openapi.from_url(f"{hostile.stack.url}/openapi.json").include(path_regex=SERVED)
    # An operation schemathesis cannot load is an Err: .ok() raises with its reason.
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 15, [op.label for op in operations]
    failures: list[str] = []
    calls: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=hostile.stack.url, timeout=60)
            calls.append(response.status_code)
            case.validate_response(response, checks=[not_a_server_error])
            hostile.assert_no_secret(response.content)

        try:
            run()
        except Exception as error:  # noqa: BLE001 - collected, so every operation is tried
            failures.append(f"{operation.label}: {str(error)[:600]}")
    assert not failures, "\n".join(failures)
    assert len(calls) >= 3 * len(operations) and any(400 <= code < 500 for code in calls)
    hostile.assert_alive()
