"""Image and label downloads served from S3 by the edge (EnvoySettings.s3_endpoint), through a
real Envoy in front of a real gateway and datastore on a real SeaweedFS, with auth on.

The gateway checks the token and the id, then answers 307 to a URL the datastore presigned for
the address the edge reaches S3 at; Envoy follows it itself, without the client's token, so
the client (MONAI Label's own http.client too, which follows no redirect) gets a plain 200
with the same bytes, file name and media type as the stream through the gateway, which the
gateway never carried. Anything else addressed to S3 at the edge is refused.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from monailabel.client import MONAILabelClient

from gateway.cli import build_parser, edge_s3_endpoint
from gateway.envoy import EDGE_ETAG_HEADER, EDGE_S3_HEADER, EnvoySettings
from services.datastore.settings import DatastoreSettings
from tests.fixtures.downloads import DATA, IMAGE, LABEL, fill
from tests.fixtures.edge import running_envoy
from tests.fixtures.gateway import GatewayStack
from tests.ports import free_port

pytestmark = pytest.mark.timeout(180)

TOKEN = "edge-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class EdgeStack:
    url: str
    port: int
    gateway: GatewayStack
    s3_authority: str


@pytest.fixture(scope="module")
def edge_stack(tmp_path_factory: pytest.TempPathFactory, seaweedfs: Any) -> Iterator[EdgeStack]:
    stack = GatewayStack(
        tmp_path_factory.mktemp("edge-s3"),
        gateway_overrides={"auth_tokens": [TOKEN]},
        datastore_overrides={
            **seaweedfs.datastore_settings(),
        },
    ).start()
    try:
        fill(stack.url, AUTH)
        port, admin_port = free_port(), free_port()
        settings = EnvoySettings(
            port=port,
            admin_port=admin_port,
            gateway_address=stack.url.removeprefix("http://"),
            datastore_address=stack.datastore_address,
            s3_endpoint=seaweedfs.url,  # written http://HOST:PORT, as operators may
        )
        with running_envoy(settings, tmp_path_factory.mktemp("envoy")):
            yield EdgeStack(f"http://127.0.0.1:{port}", port, stack, seaweedfs.endpoint)
    finally:
        stack.stop()


def _gateway_307s(stack: GatewayStack) -> float:
    """307 answers the gateway counted (its own /metrics), over every route."""
    metrics = httpx.get(f"{stack.url}/metrics", headers=AUTH).text
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("labelgrid_gateway_requests_total{") and 'status="307"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_download_through_the_edge_is_served_by_s3_as_a_plain_200(edge_stack: EdgeStack) -> None:
    streamed = httpx.get(f"{edge_stack.gateway.url}/datastore/image", params={"image": IMAGE}, headers=AUTH)
    assert streamed.status_code == 200 and streamed.content == DATA
    before = _gateway_307s(edge_stack.gateway)
    answer = httpx.get(f"{edge_stack.url}/datastore/image", params={"image": IMAGE}, headers=AUTH, timeout=60)
    assert answer.status_code == 200, answer.text
    assert not answer.history and "location" not in answer.headers
    assert answer.content == DATA
    for header in ("content-disposition", "content-type", "content-length", "etag", "accept-ranges"):
        assert answer.headers[header] == streamed.headers[header], header
    # Nothing of S3's own: its request ids, metadata and validators stay behind the edge.
    assert not [name for name in answer.headers if name.startswith("x-amz-")]
    assert "last-modified" not in answer.headers
    # The gateway answered the edge with a 307 (S3 sent the bytes), not with the bytes.
    assert _gateway_307s(edge_stack.gateway) == before + 1


def test_a_range_through_the_edge_is_answered_as_the_gateway_answers_it(edge_stack: EdgeStack) -> None:
    """Envoy passes Range on to S3; the 206 matches the one the gateway streams (gateway.ranges)."""
    for asked in ("bytes=10-99", "bytes=-500", f"bytes={len(DATA) // 2}-"):
        headers = {**AUTH, "range": asked}
        streamed = httpx.get(f"{edge_stack.gateway.url}/datastore/image", params={"image": IMAGE}, headers=headers)
        answer = httpx.get(f"{edge_stack.url}/datastore/image", params={"image": IMAGE}, headers=headers, timeout=60)
        assert streamed.status_code == answer.status_code == 206, (asked, answer.text)
        assert answer.headers["content-range"] == streamed.headers["content-range"], asked
        assert answer.content == streamed.content, asked
        assert "x-amz-request-id" not in answer.headers and "x-amz-id-2" not in answer.headers, asked


def _edge_cases(etag: str) -> list[tuple[dict[str, str], bool]]:
    """(request headers, whether S3 serves them through the edge) for one file."""
    size = len(DATA)
    return [
        ({}, True),
        ({"range": "bytes=0-0"}, True),
        ({"range": f"bytes={size - 1}-"}, True),
        ({"range": f"bytes=5-{size + 1000}"}, True),
        ({"range": f"bytes=-{size * 2}"}, True),
        ({"range": "bytes=10-99", "if-range": etag}, True),
        # S3 compares these with its own ETag and dates; the stream ignores them, so does the edge.
        ({"if-none-match": etag}, True),
        ({"if-match": '"another"'}, True),
        ({"if-modified-since": "Fri, 01 Jan 2100 00:00:00 GMT"}, True),
        ({"range": "bytes=10-99", "if-unmodified-since": "Thu, 01 Jan 1970 00:00:00 GMT"}, True),
        # Answered by the stream: a 416 in MONAI Label's shape, or the whole file.
        ({"range": f"bytes={size}-"}, False),
        ({"range": f"bytes={size + 10}-{size + 20}"}, False),
        ({"range": "bytes=0-9,20-29"}, False),
        ({"range": "bytes=abc"}, False),
        ({"range": "bytes = 10-99"}, False),
        ({"range": "items=0-9"}, False),
        ({"range": "bytes=0-99999999999999999999999"}, False),
        ({"range": "bytes=10-99", "if-range": '"stale"'}, False),
        ({"range": "bytes=10-99", "if-range": "Fri, 01 Jan 2100 00:00:00 GMT"}, False),
    ]


def test_every_range_and_condition_is_answered_as_the_stream_answers_it(edge_stack: EdgeStack) -> None:
    """Status, Content-Range, ETag and bytes through the edge equal the gateway's own stream for
    the same headers; S3 serves the ranges it answers alike, the stream answers the rest."""
    url, params = "/datastore/image", {"image": IMAGE}
    etag = httpx.get(f"{edge_stack.gateway.url}{url}", params=params, headers=AUTH).headers["etag"]
    with httpx.Client(base_url=edge_stack.url, headers=AUTH, timeout=60) as edge:
        with httpx.Client(base_url=edge_stack.gateway.url, headers=AUTH, timeout=60) as gateway:
            for headers, by_s3 in _edge_cases(etag):
                streamed = gateway.get(url, params=params, headers=headers)
                before = _gateway_307s(edge_stack.gateway)
                answer = edge.get(url, params=params, headers=headers)
                assert answer.status_code == streamed.status_code, (headers, answer.text)
                for header in ("content-range", "etag", "content-length", "content-type"):
                    assert answer.headers.get(header) == streamed.headers.get(header), (headers, header)
                assert answer.content == streamed.content, headers
                assert _gateway_307s(edge_stack.gateway) == before + by_s3, headers
    assert streamed.status_code == 200 and streamed.content == DATA  # the last case: the whole file


def test_a_client_header_cannot_set_the_etag_of_an_edge_download(edge_stack: EdgeStack) -> None:
    forged = {**AUTH, EDGE_ETAG_HEADER: '"forged"'}
    answer = httpx.get(f"{edge_stack.url}/datastore/image", params={"image": IMAGE}, headers=forged, timeout=60)
    assert answer.status_code == 200 and answer.content == DATA
    assert answer.headers["etag"] != '"forged"' and answer.headers["etag"].strip('"')


def test_monailabel_clients_get_labels_and_images_from_s3(edge_stack: EdgeStack, tmp_path: Path) -> None:
    """MONAI Label's client reads labels with http.client (no redirects) and sends the token on."""
    client = MONAILabelClient(edge_stack.url, tmpdir=str(tmp_path), client_id="edge-test")
    client.update_auth({"token_type": "Bearer", "access_token": TOKEN})
    path = client.download_label(IMAGE, "final")
    assert Path(path).read_bytes() == LABEL and path.endswith(".nii.gz")
    connection = http.client.HTTPConnection("127.0.0.1", edge_stack.port, timeout=60)
    try:
        connection.request("GET", f"/datastore/image?image={IMAGE}", headers=AUTH)
        response = connection.getresponse()
        assert response.status == 200 and response.read() == DATA
        assert response.getheader("content-disposition") == 'attachment; filename="scan_one.nii.gz"'
    finally:
        connection.close()


def test_auth_and_ids_are_checked_before_anything_reaches_s3(edge_stack: EdgeStack) -> None:
    url = f"{edge_stack.url}/datastore/image"
    refused = httpx.get(url, params={"image": IMAGE})
    assert refused.status_code == 401 and refused.content != DATA
    # A range, or a forged edge header, changes nothing without a token.
    for headers in ({"range": "bytes=0-99"}, {"range": "bytes=-10", EDGE_ETAG_HEADER: '"x"', EDGE_S3_HEADER: "x"}):
        refused = httpx.get(url, params={"image": IMAGE}, headers=headers)
        assert refused.status_code == 401 and DATA[:10] not in refused.content, headers
    for params, status in (({"image": "nothing-here"}, 404), ({"image": "../etc/passwd"}, 400)):
        answer = httpx.get(url, params=params, headers=AUTH)
        assert answer.status_code == status, answer.text
        assert json.loads(answer.content)  # the gateway's own error, not S3's XML
    missing = httpx.get(f"{edge_stack.url}/datastore/label", params={"label": IMAGE, "tag": "nope"}, headers=AUTH)
    assert missing.status_code == 404 and "location" not in missing.headers


def test_redirect_false_streams_through_the_gateway(edge_stack: EdgeStack) -> None:
    before = _gateway_307s(edge_stack.gateway)
    answer = httpx.get(
        f"{edge_stack.url}/datastore/image", params={"image": IMAGE, "redirect": "false"}, headers=AUTH, timeout=60
    )
    assert answer.status_code == 200 and answer.content == DATA
    assert answer.headers["etag"].strip('"') != ""  # the gateway's sha256 etag: it streamed
    assert _gateway_307s(edge_stack.gateway) == before


def test_a_forged_edge_header_is_overwritten(edge_stack: EdgeStack) -> None:
    """The edge sets the header itself on the download routes (a forged prefix would make the
    gateway stream: no 307); every other route drops it (test_envoy.py checks the config)."""
    forged = {**AUTH, EDGE_S3_HEADER: "http://attacker.example/"}
    before = _gateway_307s(edge_stack.gateway)
    answer = httpx.get(f"{edge_stack.url}/datastore/image", params={"image": IMAGE}, headers=forged, timeout=60)
    assert answer.status_code == 200 and answer.content == DATA
    assert _gateway_307s(edge_stack.gateway) == before + 1


def test_s3_is_not_reachable_through_the_edge_except_by_a_presigned_get(edge_stack: EdgeStack) -> None:
    """Requests addressed to the S3 host at the edge: only a presigned GET would pass (and only
    the datastore can sign one); everything else is Envoy's 404, never S3's answer."""
    host = {"Host": edge_stack.s3_authority}
    with httpx.Client(base_url=edge_stack.url, headers=host, timeout=30) as edge:
        for method, path in (
            ("GET", "/"),
            ("GET", f"/{IMAGE}"),
            ("GET", "/labelgrid/images/scan_one.nii.gz"),
            ("PUT", "/new-bucket"),
            ("DELETE", "/labelgrid/images/scan_one.nii.gz?X-Amz-Signature=0"),
            ("HEAD", "/labelgrid/images/scan_one.nii.gz?X-Amz-Signature=0"),
        ):
            answer = edge.request(method, path)
            assert answer.status_code == 404, (method, path, answer.status_code)
            assert b"<?xml" not in answer.content
        # A forged signature reaches S3, which refuses it (403), as it would anyone's.
        forged = edge.get("/labelgrid/images/scan_one.nii.gz?X-Amz-Signature=0")
        assert forged.status_code == 403


def test_labelgrid_up_gives_envoy_the_datastores_plain_http_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """`up` resolves the endpoint as the datastore child will (flag, else env, else its default)."""
    for name in ("LABELGRID_S3_ENDPOINT", "LABELGRID_S3_SECURE"):
        monkeypatch.delenv(name, raising=False)

    def edge(*argv: str) -> str:
        return edge_s3_endpoint(build_parser().parse_args(["up", *argv]))

    assert edge() == ""  # the local folder
    assert edge("--backend", "s3") == DatastoreSettings().s3_endpoint
    assert edge("--backend", "s3", "--s3-endpoint", "http://minio:9000") == "http://minio:9000"
    assert edge("--backend", "s3", "--s3-endpoint", "https://s3.example.org:443") == ""
    assert edge("--backend", "s3", "--studies", "http://127.0.0.1:8042/dicom-web") == ""
    monkeypatch.setenv("LABELGRID_S3_ENDPOINT", "minio-from-env:9000")
    assert edge("--backend", "s3") == "minio-from-env:9000"
    monkeypatch.setenv("LABELGRID_S3_SECURE", "y")  # as the datastore's settings read it
    assert edge("--backend", "s3") == ""
