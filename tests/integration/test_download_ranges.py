"""Byte ranges of downloads streamed through the gateway (gateway.ranges), on a real gateway and
datastore (local folder): a resumed download gets the rest of the file as a 206. Images and
labels, model weights and session images: every file MONAI Label serves with FileResponse.

MONAI Label serves these files with Starlette's FileResponse; every single range is answered
here as that response answers it for the same bytes (status, Content-Range, body). Where the
gateway deliberately differs (several ranges, bad syntax: the whole file, as the RFC allows,
not a multipart 206 or a 400), the test says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from gateway.envoy import EnvoySettings
from gateway.ranges import ByteRange, parse_range
from services.common.bundles import reset_weights
from services.common.datastore_client import DatastoreClient
from tests.fixtures.downloads import DATA, IMAGE, LABEL, fill
from tests.fixtures.edge import running_envoy
from tests.fixtures.gateway import GatewayStack
from tests.ports import free_port

pytestmark = pytest.mark.timeout(120)

SIZE = len(DATA)
ETAG = f'"{hashlib.sha256(DATA).hexdigest()}"'


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    running = GatewayStack(tmp_path_factory.mktemp("ranges")).start()
    fill(running.url)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def monailabel_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The same bytes as MONAI Label serves a stored image: Starlette's FileResponse."""
    path = tmp_path_factory.mktemp("starlette") / "scan_one.nii.gz"
    path.write_bytes(DATA)
    app = Starlette(routes=[Route("/image", lambda request: FileResponse(path, filename=path.name))])
    with TestClient(app) as client:
        yield client


def get_image(stack: GatewayStack, **headers: str) -> httpx.Response:
    return httpx.get(f"{stack.url}/datastore/image", params={"image": IMAGE}, headers=headers, timeout=60)


@pytest.mark.parametrize(
    "asked",
    [
        "bytes=0-0",
        "bytes=10-99",
        f"bytes=1000-{SIZE - 1}",
        "bytes=1000-",
        f"bytes={SIZE - 1}-",
        "bytes=-500",
        f"bytes=-{SIZE + 10}",  # a suffix longer than the file: all of it
        f"bytes=5-{SIZE * 2}",  # an end past the file: to the end
        f"bytes={SIZE}-",  # starts at the end: 416
        f"bytes={SIZE + 100}-{SIZE + 200}",
        "bytes=0-" + "9" * 30,  # beyond any int64: to the end
        "bytes=" + "9" * 30 + "-",  # and past the end
        "bytes=-" + "9" * 30,
    ],
)
def test_one_range_is_answered_as_monailabel_answers_it(
    stack: GatewayStack, monailabel_files: TestClient, asked: str
) -> None:
    ours = get_image(stack, range=asked)
    theirs = monailabel_files.get("/image", headers={"range": asked})
    assert ours.status_code == theirs.status_code, ours.text
    assert ours.headers["content-range"] == theirs.headers["content-range"]
    if ours.status_code == 206:
        assert ours.content == theirs.content
        assert ours.headers["content-length"] == str(len(ours.content))
        assert ours.headers["etag"] == ETAG and ours.headers["accept-ranges"] == "bytes"
    else:
        assert ours.status_code == 416 and ours.json()["detail"]


@pytest.mark.parametrize(
    "asked",
    ["bytes=0-1,5-6", "bytes=a-b", "bytes=9-3", "items=0-5", "bytes=-0", "bytes=-", "bytes 0-5"],
)
def test_anything_but_one_byte_range_gets_the_whole_file(stack: GatewayStack, asked: str) -> None:
    answer = get_image(stack, range=asked)
    assert answer.status_code == 200 and answer.content == DATA
    assert "content-range" not in answer.headers


def test_a_resumed_download_puts_the_file_back_together(stack: GatewayStack) -> None:
    plain = get_image(stack)
    assert plain.status_code == 200 and plain.headers["accept-ranges"] == "bytes"
    cut = SIZE // 3  # what arrived before the connection dropped
    rest = get_image(stack, range=f"bytes={cut}-", **{"if-range": plain.headers["etag"]})
    assert rest.status_code == 206
    assert DATA[:cut] + rest.content == DATA


def test_if_range_of_another_version_gets_the_whole_file(stack: GatewayStack) -> None:
    for stale in ('"' + "0" * 64 + '"', "Wed, 21 Oct 2015 07:28:00 GMT", f"W/{ETAG}"):
        answer = get_image(stack, range="bytes=10-20", **{"if-range": stale})
        assert answer.status_code == 200 and answer.content == DATA, stale


def test_labels_answer_ranges_and_unknown_files_stay_404(stack: GatewayStack) -> None:
    label = httpx.get(
        f"{stack.url}/datastore/label", params={"label": IMAGE, "tag": "final"}, headers={"range": "bytes=-100"}
    )
    assert label.status_code == 206 and label.content == LABEL[-100:]
    assert label.headers["content-range"] == f"bytes {len(LABEL) - 100}-{len(LABEL) - 1}/{len(LABEL)}"
    for params in ({"image": "nope"}, {"image": "../etc/passwd"}):
        for asked in ("bytes=0-10", "bytes=-10"):
            answer = httpx.get(f"{stack.url}/datastore/image", params=params, headers={"range": asked})
            assert answer.status_code in (400, 404) and "detail" in answer.json(), (params, asked)


def test_model_weights_and_session_images_answer_ranges(stack: GatewayStack, tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    weights.write_bytes(os.urandom(300_000))

    def on_datastore(call: Callable[[DatastoreClient], Awaitable[object]]) -> None:
        async def run() -> None:
            client = DatastoreClient(stack.datastore_address, timeout_seconds=30)
            try:
                await call(client)
            finally:
                await client.close()

        asyncio.run(run())

    on_datastore(lambda client: client.upload_model_version("ranged", weights, metrics={}, info={}))
    model = httpx.get(f"{stack.url}/model/ranged", headers={"range": "bytes=1000-1999"}, timeout=60)
    assert model.status_code == 206 and model.content == weights.read_bytes()[1000:2000]
    assert model.headers["content-range"] == "bytes 1000-1999/300000"
    assert 'filename="ranged.pt"' in model.headers["content-disposition"]
    past = httpx.get(f"{stack.url}/model/ranged", headers={"range": "bytes=300000-"}, timeout=60)
    assert past.status_code == 416 and past.headers["content-range"] == "bytes */300000"
    unknown = httpx.get(f"{stack.url}/model/no_such_model", headers={"range": "bytes=-10"}, timeout=60)
    assert unknown.status_code == 404 and "detail" in unknown.json()
    # A model serving its initial weights has no weights file: 404 with any range, as without one.
    on_datastore(lambda client: reset_weights(client, "ranged", "a test"))
    for asked in (None, "bytes=0-9", "bytes=-10", "bytes=100000-", "bytes=0-0,5-9"):
        initial = httpx.get(f"{stack.url}/model/ranged", headers={"range": asked} if asked else {}, timeout=60)
        assert initial.status_code == 404, (asked, initial.status_code)
        assert initial.json() == {"detail": "Model File NOT Found for ranged"}, asked

    created = httpx.put(f"{stack.url}/session/", files={"files": ("local.nii.gz", LABEL)}, timeout=60)
    assert created.status_code == 200, created.text
    session = f"{stack.url}/session/{created.json()['session_id']}"
    rest = httpx.get(session, params={"image": "true"}, headers={"range": "bytes=100-"}, timeout=60)
    assert rest.status_code == 206 and rest.content == LABEL[100:]
    assert rest.headers["content-range"] == f"bytes 100-{len(LABEL) - 1}/{len(LABEL)}"


def test_a_range_through_envoy_reaches_the_gateway(stack: GatewayStack, tmp_path: Path) -> None:
    """`labelgrid up` on the local folder: the client's Range passes the edge and the gateway answers it."""
    port = free_port()
    settings = EnvoySettings(
        port=port,
        admin_port=free_port(),
        gateway_address=stack.url.removeprefix("http://"),
        datastore_address=stack.datastore_address,
    )
    with running_envoy(settings, tmp_path):
        answer = httpx.get(
            f"http://127.0.0.1:{port}/datastore/image",
            params={"image": IMAGE},
            headers={"range": "bytes=100-199"},
            timeout=60,
        )
    assert answer.status_code == 206 and answer.content == DATA[100:200]
    assert answer.headers["content-range"] == f"bytes 100-199/{SIZE}"


def test_parse_range() -> None:
    assert parse_range(None) is None
    assert parse_range("bytes=0-") == ByteRange(0, None)
    assert parse_range(" bytes = 3 - 7 ") == ByteRange(3, 7)
    assert parse_range("bytes=-5") == ByteRange(None, 5)
    assert ByteRange(None, 5).read(3) == (0, 0) and ByteRange(None, 5).read(10) == (5, 0)
    assert ByteRange(3, 7).read() == (3, 5) and ByteRange(3, None).read() == (3, 0)
    assert ByteRange(int("9" * 30), None).read() == (1 << 62, 0)
    assert ByteRange(0, int("9" * 30)).read() == (0, 1 << 62)
