"""/proxy/dicom/*: the gateway's DICOMweb proxy in front of a real Orthanc, driven by the real
dicomweb-client (as OHIF drives it: QIDO, WADO, STOW on the REST API's origin)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient

from tests.fixtures.gateway import GatewayStack, offline_app
from tests.fixtures.orthanc import Orthanc, ct_series, run_orthanc
from tests.ports import free_port


@pytest.fixture(scope="module")
def proxy_stack(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc) -> Iterator[GatewayStack]:
    stack = GatewayStack(
        tmp_path_factory.mktemp("proxy"), gateway_overrides={"dicomweb_url": orthanc.dicomweb_url}
    ).start()
    yield stack
    stack.stop()


def proxied_client(url: str) -> DICOMwebClient:
    """dicomweb-client as OHIF's app-config.js points it: qido / wado / stow under /proxy/dicom."""
    return DICOMwebClient(
        url=f"{url}/proxy/dicom", qido_url_prefix="qido", wado_url_prefix="wado", stow_url_prefix="stow"
    )


def test_qido_wado_round_trip(proxy_stack: GatewayStack, orthanc: Orthanc) -> None:
    series = ct_series(patient_id="PROXY-QIDO", seed=1)
    orthanc.upload(series.datasets)
    client = proxied_client(proxy_stack.url)

    studies = client.search_for_studies(search_filters={"PatientID": "PROXY-QIDO"})
    assert [s["0020000D"]["Value"][0] for s in studies] == [series.study_uid]
    found = client.search_for_series(series.study_uid)
    assert [s["0020000E"]["Value"][0] for s in found] == [series.series_uid]

    # WADO-RS instances (multipart/related; type="application/dicom"): the same pixels back.
    instances = client.retrieve_series(series.study_uid, series.series_uid)
    assert len(instances) == len(series.datasets)
    by_uid = {ds.SOPInstanceUID: ds for ds in series.datasets}
    for instance in instances:
        sent = by_uid[instance.SOPInstanceUID]
        assert np.array_equal(instance.pixel_array, np.frombuffer(sent.PixelData, np.int16).reshape(16, 20))

    # Frames (multipart/related; application/octet-stream), as cornerstone asks for them.
    first = series.datasets[0]
    frames = client.retrieve_instance_frames(
        series.study_uid,
        series.series_uid,
        first.SOPInstanceUID,
        [1],
        media_types=(("application/octet-stream", "1.2.840.10008.1.2.1"),),  # Orthanc 1.10 wants it named
    )
    assert frames[0] == first.PixelData


def test_qido_metadata_is_rewritten_to_wado_and_plain_route_works(proxy_stack: GatewayStack, orthanc: Orthanc) -> None:
    series = ct_series(patient_id="PROXY-META", seed=2)
    orthanc.upload(series.datasets)
    path = f"studies/{series.study_uid}/series/{series.series_uid}/metadata"
    for route in (f"/proxy/dicom/qido/{path}", f"/proxy/dicom/wado/{path}", f"/proxy/dicom/{path}"):
        answer = httpx.get(proxy_stack.url + route, headers={"Accept": "application/dicom+json"})
        assert answer.status_code == 200, route
        assert answer.headers["content-type"].startswith("application/dicom+json"), route
        assert len(answer.json()) == len(series.datasets), route
    # Query strings pass through as sent (includefield lists, fuzzy matching).
    answer = httpx.get(
        f"{proxy_stack.url}/proxy/dicom/qido/studies?PatientID=PROXY-META&includefield=00081030,00080060"
    )
    assert answer.status_code == 200
    assert [s["0020000D"]["Value"][0] for s in answer.json()] == [series.study_uid]


def test_stow_streams_a_large_body_to_the_pacs(proxy_stack: GatewayStack, orthanc: Orthanc) -> None:
    # 12 slices of 512 x 512 int16: a 6 MiB multipart/related body through the proxy.
    series = ct_series(slices=12, rows=512, columns=512, patient_id="PROXY-STOW", seed=3)
    client = proxied_client(proxy_stack.url)
    client.store_instances(series.datasets, series.study_uid)
    assert series.series_uid in orthanc.series_uids()
    back = DICOMwebClient(url=orthanc.dicomweb_url).retrieve_series(series.study_uid, series.series_uid)
    got = {ds.SOPInstanceUID: ds.PixelData for ds in back}
    assert got == {ds.SOPInstanceUID: ds.PixelData for ds in series.datasets}


def test_path_tricks_never_reach_the_pacs(proxy_stack: GatewayStack) -> None:
    for raw in (b"/proxy/dicom/qido/%2e%2e/%2e%2e/instances", b"/proxy/dicom/wado/..%2f..%2fsystem"):
        with httpx.Client() as client:
            request = client.build_request("GET", proxy_stack.url + "/")
            request.url = request.url.copy_with(raw_path=raw)
            answer = client.send(request)
        assert answer.status_code == 400, raw
        assert "Version" not in answer.text  # Orthanc's /system never answered


def test_a_pacs_that_is_down_is_503_with_the_reason() -> None:
    with offline_app(dicomweb_url=f"http://127.0.0.1:{free_port()}/dicom-web") as client:
        answer = client.get("/proxy/dicom/qido/studies")
        assert answer.status_code == 503
        assert "unavailable" in answer.json()["detail"]


def test_no_dicomweb_source_is_503() -> None:
    with offline_app() as client:
        answer = client.get("/proxy/dicom/qido/studies")
        assert answer.status_code == 503
        assert "--studies http" in answer.json()["detail"]


@pytest.fixture(scope="module")
def orthanc_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path_factory.mktemp("orthanc-auth"), users={"pacsuser": "s3cret-pw"}) as server:
        yield server


def test_credentials_are_added_server_side_and_never_logged(
    orthanc_with_auth: Orthanc, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    url = orthanc_with_auth.dicomweb_url
    assert httpx.get(f"{url}/studies").status_code == 401  # the PACS really wants them
    caplog.set_level(logging.DEBUG)
    with offline_app(dicomweb_url=url, dicomweb_username="pacsuser", dicomweb_password="s3cret-pw") as client:
        answer = client.get("/proxy/dicom/qido/studies")
        assert answer.status_code in (200, 204)
        assert "www-authenticate" not in answer.headers
    with offline_app(dicomweb_url=url, dicomweb_username="pacsuser", dicomweb_password="wrong") as client:
        answer = client.get("/proxy/dicom/qido/studies")
        assert answer.status_code == 502
        assert "credentials" in answer.json()["detail"] and "wrong" not in answer.text
        assert "www-authenticate" not in answer.headers
    assert "s3cret-pw" not in caplog.text and "wrong" not in caplog.text


def test_with_auth_on_the_proxy_wants_a_labelgrid_token(orthanc: Orthanc) -> None:
    client: TestClient
    with offline_app(dicomweb_url=orthanc.dicomweb_url, auth_tokens=["tok-1"]) as client:
        assert client.get("/proxy/dicom/qido/studies").status_code == 401
        answer = client.get("/proxy/dicom/qido/studies", headers={"Authorization": "Bearer tok-1"})
        assert answer.status_code in (200, 204)
