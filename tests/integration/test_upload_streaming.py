"""Uploads streamed from the request body into the datastore (gateway.multipart): a form whose
fields come after its file, a client that hangs up mid-body and an upload over the size cap,
each against a real datastore; nothing half-stored, no spool left behind."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.contract.helpers import nifti_bytes
from tests.fixtures.gateway import GatewayStack
from tests.fixtures.multipart import CONTENT_TYPE, form
from tests.fixtures.polling import wait_until

pytestmark = pytest.mark.timeout(120)

CAP = 2 * 1024 * 1024
NIFTI = nifti_bytes(seed=21)
LABEL = nifti_bytes(seed=22, dtype="uint8")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    stack = GatewayStack(tmp_path_factory.mktemp("streaming"), datastore_overrides={"max_upload_bytes": CAP}).start()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def http(stack: GatewayStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


def put(http: httpx.Client, path: str, query: dict[str, str], body: bytes) -> httpx.Response:
    headers = {"content-type": CONTENT_TYPE}
    return http.put(path, params=query, content=body, headers=headers)


def test_params_before_file_stream(http: httpx.Client) -> None:
    body = form(("params", None, json.dumps({"client_id": "a", "k": 1}).encode()), ("file", "s1.nii.gz", NIFTI))
    answer = put(http, "/datastore/image", {}, body)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"image": "s1"}
    assert http.get("/datastore/image", params={"image": "s1"}).content == NIFTI
    assert http.get("/datastore/image/info", params={"image": "s1"}).json()["k"] == 1


def test_a_file_over_one_chunk_arrives_byte_for_byte(http: httpx.Client) -> None:
    """More than one 1 MiB message, sent in odd-sized network pieces, on both paths."""
    volume = nifti_bytes((64, 64, 80), seed=23, gz=False)
    assert 1024 * 1024 < len(volume) < CAP
    for n, params_first in enumerate((True, False)):
        parts = [("params", None, b'{"n": 1}'), ("file", f"big{n}.nii", volume)]
        body = form(*(parts if params_first else parts[::-1]))
        pieces = (body[i : i + 7777] for i in range(0, len(body), 7777))
        headers = {"content-type": CONTENT_TYPE}
        answer = http.put("/datastore/image", content=pieces, headers=headers)
        assert answer.status_code == 200, answer.text
        assert http.get("/datastore/image", params={"image": f"big{n}"}).content == volume
        assert http.get("/datastore/image/info", params={"image": f"big{n}"}).json()["n"] == 1


def test_params_after_file_are_applied(http: httpx.Client) -> None:
    body = form(("file", "s2.nii.gz", NIFTI), ("params", None, json.dumps({"k": "after"}).encode()))
    answer = put(http, "/datastore/image", {"image": "s2"}, body)
    assert answer.status_code == 200, answer.text
    assert http.get("/datastore/image", params={"image": "s2"}).content == NIFTI
    assert http.get("/datastore/image/info", params={"image": "s2"}).json()["k"] == "after"
    label = form(("label", "s2.nii.gz", LABEL), ("params", None, json.dumps({"who": "late"}).encode()))
    answer = put(http, "/datastore/label", {"image": "s2", "tag": "final"}, label)
    assert answer.status_code == 200, answer.text
    assert http.get("/datastore/label", params={"label": "s2", "tag": "final"}).content == LABEL
    assert http.get("/datastore/label/info", params={"label": "s2", "tag": "final"}).json()["who"] == "late"


def test_bad_params_after_file_store_nothing(http: httpx.Client, stack: GatewayStack) -> None:
    body = form(("file", "s3.nii.gz", NIFTI), ("params", None, b"{not json"))
    assert put(http, "/datastore/image", {}, body).status_code == 422
    assert http.get("/datastore/image/info", params={"image": "s3"}).json() == {}
    assert stack.upload_spools() == []


def test_missing_file_part_and_empty_file(http: httpx.Client) -> None:
    assert put(http, "/datastore/image", {"image": "s4"}, form(("params", None, b"{}"))).status_code == 422
    empty = form(("params", None, b"{}"), ("file", "s4.nii.gz", b""))
    answer = put(http, "/datastore/image", {}, empty)
    assert answer.status_code == 422 and "empty" in answer.json()["detail"]
    not_multipart = http.put("/datastore/image", params={"image": "s4"}, content=NIFTI)
    assert not_multipart.status_code == 422
    assert http.get("/datastore/image/info", params={"image": "s4"}).json() == {}


@pytest.mark.parametrize("params_first", [True, False])
def test_over_the_cap_is_413_and_stores_nothing(http: httpx.Client, stack: GatewayStack, params_first: bool) -> None:
    big = NIFTI + b"\0" * (CAP + 1024)
    parts = [("params", None, b"{}"), ("file", "big.nii.gz", big)]
    answer = put(http, "/datastore/image", {"image": "big"}, form(*(parts if params_first else parts[::-1])))
    assert answer.status_code == 413, answer.text
    assert str(CAP) in answer.json()["detail"]
    assert http.get("/datastore/image/info", params={"image": "big"}).json() == {}
    wait_until(lambda: stack.upload_spools() == [], "the spool to be removed")


def test_client_hanging_up_mid_upload_stores_nothing(http: httpx.Client, stack: GatewayStack) -> None:
    head = form(("params", None, b"{}"), ("file", "gone.nii.gz", b"")).rsplit(b"\r\n--", 1)[0]
    sent = head + NIFTI[: len(NIFTI) // 2] + b"\0" * (1024 * 1024)  # over one chunk: the stream has begun
    host, port = stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            (
                f"PUT /datastore/image?image=gone HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: {CONTENT_TYPE}\r\n"
                f"Content-Length: {len(sent) + 10 * 1024 * 1024}\r\n\r\n"
            ).encode()
            + sent
        )
        wait_until(lambda: stack.upload_spools() != [], "the datastore to start spooling the upload")
    wait_until(lambda: stack.upload_spools() == [], "the spool of the abandoned upload to be removed")
    assert http.get("/datastore/image/info", params={"image": "gone"}).json() == {}
    # The service is fine afterwards.
    body = form(("params", None, b"{}"), ("file", "gone.nii.gz", NIFTI))
    assert put(http, "/datastore/image", {}, body).status_code == 200
