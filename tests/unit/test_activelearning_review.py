"""Review fixes of the active learning service: odd input at the gateway, scoring jobs that
meet deleted images or cancels, the SDK's no-sample reason."""

from __future__ import annotations

import pytest

from gateway.errors import GatewayError
from gateway.routes.activelearning import _ttl


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e300, 2**31, 10**400, -(2**40)])
def test_gateway_refuses_non_finite_and_huge_lease_ttls_with_a_4xx(value: object) -> None:
    with pytest.raises(GatewayError) as err:
        _ttl({"lease_ttl_seconds": value})
    assert err.value.status in (400, 422)


def test_gateway_passes_ordinary_lease_ttls() -> None:
    assert _ttl({"lease_ttl_seconds": 60}) == 60 and _ttl({"lease_ttl_seconds": 60.0}) == 60 and _ttl({}) == 0
