"""Module-scoped stacks for the gateway tests: a real datastore and gateway (`gateway_stack`,
`gateway_url`), and with the real inference service (`inference_stack`); tests/fixtures/gateway.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.gateway import GatewayStack, real_inference


@pytest.fixture(scope="module")
def gateway_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    stack = GatewayStack(tmp_path_factory.mktemp("gateway")).start()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def gateway_url(gateway_stack: GatewayStack) -> str:
    return gateway_stack.url


@pytest.fixture(scope="module")
def inference_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayStack]:
    """Datastore, real inference service and gateway; the inference scratch dir is root/infer."""
    root = tmp_path_factory.mktemp("inference")
    stack = GatewayStack(root, start_inference=real_inference(root / "infer")).start()
    yield stack
    stack.stop()
