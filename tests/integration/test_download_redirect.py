"""The download redirect (gateway download_redirect, datastore s3_public_endpoint) on a real
SeaweedFS: GET /datastore/image answers 307 to a short-lived presigned GET after the auth
check, and a client following it gets the same bytes, file name and media type as the stream
through the gateway; labels stream unless asked; elsewhere (local folder) it streams."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import requests
from monailabel.client import MONAILabelClient

from tests.fixtures.downloads import DATA, IMAGE, LABEL, fill
from tests.fixtures.gateway import GatewayStack

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret"


def _s3_stack(root: Path, seaweedfs: Any, **gateway: Any) -> GatewayStack:
    return GatewayStack(
        root,
        gateway_overrides={"download_redirect": True, **gateway},
        datastore_overrides={
            **seaweedfs.datastore_settings(),
            "s3_public_endpoint": seaweedfs.url,
        },
    ).start()


@pytest.fixture(scope="module")
def open_stack(tmp_path_factory: pytest.TempPathFactory, seaweedfs: Any) -> Iterator[GatewayStack]:
    stack = _s3_stack(tmp_path_factory.mktemp("redirect"), seaweedfs)
    fill(stack.url)
    yield stack
    stack.stop()


def _check_location(answer: httpx.Response, seaweedfs: Any) -> dict[str, list[str]]:
    assert answer.status_code == 307, answer.text
    assert answer.headers["cache-control"] == "no-store"
    location = urlsplit(answer.headers["location"])
    assert f"{location.scheme}://{location.netloc}" == seaweedfs.url  # the public endpoint
    query = parse_qs(location.query)
    assert query["X-Amz-Expires"] == ["60"]  # download_redirect_seconds: short-lived
    return query


def test_an_image_download_is_handed_to_s3_with_the_same_file(open_stack: GatewayStack, seaweedfs: Any) -> None:
    params = {"image": IMAGE}
    streamed = httpx.get(f"{open_stack.url}/datastore/image", params={**params, "redirect": "false"})
    assert streamed.status_code == 200 and streamed.content == DATA
    answer = httpx.get(f"{open_stack.url}/datastore/image", params=params)
    query = _check_location(answer, seaweedfs)
    assert query["response-content-disposition"] == [streamed.headers["content-disposition"]]
    followed = httpx.get(answer.headers["location"])
    assert followed.status_code == 200 and followed.content == DATA
    for header in ("content-disposition", "content-type", "content-length"):
        assert followed.headers[header] == streamed.headers[header], header
    assert streamed.headers["content-disposition"] == 'attachment; filename="scan_one.nii.gz"'
    # python requests (Slicer's and most scripts' client) follows it by itself.
    got = requests.get(f"{open_stack.url}/datastore/image", params=params, timeout=60)
    assert got.status_code == 200 and got.history[0].status_code == 307
    assert hashlib.sha256(got.content).digest() == hashlib.sha256(DATA).digest()


def test_labels_stream_unless_asked(open_stack: GatewayStack, seaweedfs: Any) -> None:
    """MONAI Label's client reads labels with http.client, which follows no redirect."""
    params = {"label": IMAGE, "tag": "final"}
    streamed = httpx.get(f"{open_stack.url}/datastore/label", params=params)
    assert streamed.status_code == 200 and streamed.content == LABEL
    answer = httpx.get(f"{open_stack.url}/datastore/label", params={**params, "redirect": "true"})
    _check_location(answer, seaweedfs)
    followed = httpx.get(answer.headers["location"])
    assert followed.content == LABEL
    assert followed.headers["content-disposition"] == streamed.headers["content-disposition"]
    path = MONAILabelClient(open_stack.url).download_label(IMAGE, "final")
    assert Path(path).read_bytes() == LABEL and path.endswith(".nii.gz")


def test_unknown_and_invalid_ids_are_answered_before_any_url(open_stack: GatewayStack) -> None:
    for params, status in (({"image": "nothing-here"}, 404), ({"image": "../etc/passwd"}, 400)):
        answer = httpx.get(f"{open_stack.url}/datastore/image", params=params)
        assert answer.status_code == status, answer.text
        assert "location" not in answer.headers
    answer = httpx.get(f"{open_stack.url}/datastore/label", params={"label": IMAGE, "tag": "nope", "redirect": "true"})
    assert answer.status_code == 404 and "location" not in answer.headers


def test_auth_is_checked_first_and_a_token_is_never_carried_to_s3(tmp_path: Path, seaweedfs: Any) -> None:
    stack = _s3_stack(tmp_path, seaweedfs, auth_tokens=[TOKEN])
    try:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        fill(stack.url, auth)
        url = f"{stack.url}/datastore/image"
        for params in ({"image": IMAGE}, {"image": IMAGE, "redirect": "true"}):
            refused = httpx.get(url, params=params)
            assert refused.status_code == 401 and "location" not in refused.headers
        # With an Authorization header the default is the stream (urllib would carry the header on).
        streamed = httpx.get(url, params={"image": IMAGE}, headers=auth)
        assert streamed.status_code == 200 and streamed.content == DATA
        # Asked for, the redirect is followed; requests drops the header on the other host.
        got = requests.get(url, params={"image": IMAGE, "redirect": "true"}, headers=auth, timeout=60)
        assert got.status_code == 200 and got.history[0].status_code == 307 and got.content == DATA
        assert "Authorization" not in got.request.headers
    finally:
        stack.stop()


def test_the_local_folder_streams_with_the_redirect_on(tmp_path: Path) -> None:
    stack = GatewayStack(tmp_path, gateway_overrides={"download_redirect": True}).start()
    try:
        fill(stack.url)
        for params in ({"image": IMAGE}, {"image": IMAGE, "redirect": "true"}):
            answer = httpx.get(f"{stack.url}/datastore/image", params=params)
            assert answer.status_code == 200 and answer.content == DATA
    finally:
        stack.stop()
