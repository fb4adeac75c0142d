"""`labelgrid up --studies http://HOST:PORT/dicom-web`, as MONAI Label takes a PACS: the whole
stack on a real Orthanc, through Envoy (OHIF, the proxy and the REST API on one origin)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.cli import build_parser, build_stack
from tests.fixtures.labelgrid_up import Stack, start_stack, stop_stack
from tests.fixtures.orthanc import CtSeries, Orthanc, ct_series
from tests.fixtures.polling import wait_until


def test_a_url_studies_is_the_dicomweb_backend_not_a_folder(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["up", "--studies", "http://127.0.0.1:8042/dicom-web", "--work-dir", str(tmp_path / "var")]
    )
    supervisor, _ = build_stack(args, lambda line, source="": None)
    argv = {child.name: child.argv for child in supervisor.children}
    datastore, gateway = argv["datastore"], argv["gateway"]
    assert datastore[datastore.index("--backend") + 1] == "dicomweb"
    assert datastore[datastore.index("--dicomweb-url") + 1] == "http://127.0.0.1:8042/dicom-web"
    assert "--root" not in datastore
    assert gateway[gateway.index("--dicomweb-url") + 1] == "http://127.0.0.1:8042/dicom-web"
    assert not (Path.cwd() / "http:").exists()


def test_sample_studies_with_a_pacs_is_refused(tmp_path: Path) -> None:
    from gateway.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["up", "--studies", "http://127.0.0.1:9/dicom-web", "--sample-studies", "--work-dir", str(tmp_path)])
    assert exit_info.value.code == 2


@pytest.fixture(scope="module")
def pacs_up(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc) -> Iterator[tuple[Stack, CtSeries]]:
    patient = f"UP-{uuid.uuid4().hex[:8]}"
    series = ct_series(slices=4, seed=31, patient_id=patient)
    orthanc.upload(series.datasets)
    root = tmp_path_factory.mktemp("pacs-up")
    # The stack's datastore lists only this test's patient (the session's Orthanc holds others).
    os.environ["LABELGRID_DICOMWEB_SEARCH_FILTER"] = json.dumps({"Modality": "CT", "PatientID": patient})
    try:
        running = start_stack(root, sample_studies=False, extra=["--studies", orthanc.dicomweb_url])
    finally:
        del os.environ["LABELGRID_DICOMWEB_SEARCH_FILTER"]
    yield running, series
    stop_stack(running)


def test_ohif_proxy_and_api_share_the_edge(pacs_up: tuple[Stack, CtSeries]) -> None:
    stack, series = pacs_up
    page = httpx.get(f"{stack.url}/ohif/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    studies = httpx.get(
        f"{stack.url}/proxy/dicom/qido/studies", params={"StudyInstanceUID": series.study_uid}, timeout=30
    )
    assert studies.status_code == 200
    assert studies.json()[0]["0020000D"]["Value"] == [series.study_uid]

    def listed() -> bool:
        objects = httpx.get(f"{stack.url}/datastore/?output=all", timeout=30).json()["objects"]
        return set(objects) == {series.series_uid}

    wait_until(listed, "the series listed", timeout=90)
    answer = httpx.post(
        f"{stack.url}/infer/segmentation", params={"image": series.series_uid, "output": "image"}, timeout=300
    )
    assert answer.status_code == 200, answer.text
    assert not (Path.cwd() / "http:").exists()
