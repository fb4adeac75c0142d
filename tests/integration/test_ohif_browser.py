"""OHIF in a real browser: Debian's Chromium driven by Playwright (the system browser; no
browser download) opens MONAI Label's OHIF build at /ohif/ on the gateway, lists the study a
real Orthanc holds (through /proxy/dicom), opens it, connects the MONAI Label panel and runs
`segmentation` on the series by its SeriesInstanceUID. The screenshot is kept under
build/test-artifacts/ (and the test's tmp folder)."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, Response, sync_playwright

from tests.fixtures.browser import CHROMIUM
from tests.fixtures.gateway import GatewayStack, real_inference
from tests.fixtures.orthanc import CtSeries, Orthanc, ct_series

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"


@pytest.fixture(scope="module")
def ohif_case(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc) -> Iterator[tuple[GatewayStack, CtSeries]]:
    patient = f"OHIF-{uuid.uuid4().hex[:8]}"
    series = ct_series(slices=6, rows=64, columns=64, seed=41, patient_id=patient)
    orthanc.upload(series.datasets)
    root = tmp_path_factory.mktemp("ohif-browser")
    stack = GatewayStack(
        root,
        # The sample app as `labelgrid up` serves it: its /info/ labels are a list, as OHIF's panel needs.
        start_inference=real_inference(root / "infer"),
        datastore_overrides={
            "backend": "dicomweb",
            "dicomweb_url": orthanc.dicomweb_url,
            "dicomweb_search_filter": json.dumps({"Modality": "CT", "PatientID": patient}),
            "dicomweb_sync_seconds": 0,
        },
        gateway_overrides={"dicomweb_url": orthanc.dicomweb_url},
    ).start()
    yield stack, series
    stack.stop()


def _screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)
    return path


def _overlay_pixels(path: Path) -> int:
    """Pixels of the viewports (left of the panel) in the segments' orange-red colours."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=int)[:, 280:1110]
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((red > 150) & (green < 140) & (blue < 90) & (red - green > 80)).sum())


def test_ohif_lists_opens_and_segments_a_pacs_series(ohif_case: tuple[GatewayStack, CtSeries], tmp_path: Path) -> None:
    stack, series = ohif_case
    errors: list[str] = []
    calls: list[tuple[str, int]] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"],
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            # The panel's server (its default is http://<host>:8000/): the gateway itself.
            context.add_cookies([{"name": "MONAILABEL_SERVER_URL", "value": f"{stack.url}/", "url": stack.url}])
            page = context.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))

            def record(response: Response) -> None:
                if "/ohif/" not in response.url:
                    calls.append((f"{response.request.method} {response.url.removeprefix(stack.url)}", response.status))

            page.on("response", record)

            # The study list comes from Orthanc through the proxy.
            page.goto(f"{stack.url}/ohif/", timeout=120_000)
            page.get_by_text(series.datasets[0].PatientID).first.wait_for(timeout=180_000)
            assert any(call.startswith("GET /proxy/dicom/qido/studies") and status == 200 for call, status in calls)

            # Open it in the MONAI Label mode; connect the panel; run segmentation.
            page.goto(f"{stack.url}/ohif/monai-label?StudyInstanceUIDs={series.study_uid}", timeout=120_000)
            connect = page.locator(".monaiLabelPanel button.actionButton").first
            connect.wait_for(timeout=180_000)
            with page.expect_response(lambda r: r.url.startswith(f"{stack.url}/info/"), timeout=120_000) as info:
                connect.click(force=True)
            assert info.value.status == 200
            run = page.get_by_title("Run Segmentation", exact=True)
            run.wait_for(timeout=120_000)
            # The series' images must be loaded before the panel can place a labelmap on them.
            page.wait_for_function("() => document.querySelectorAll('canvas').length > 0", timeout=120_000)
            before = _overlay_pixels(_screenshot(page, tmp_path, "ohif-before.png"))
            with page.expect_response(lambda r: "/infer/segmentation" in r.url, timeout=300_000) as infer:
                run.click(force=True)
            answer = infer.value
            assert answer.status == 200, answer.text()
            assert f"image={series.series_uid}" in answer.url and "output=image" in answer.url
            # The segmentation is drawn over the images (the sample model is untrained but seeded,
            # so what it finds is the same every run). Polled: rendering is slow on a busy CPU.
            deadline = time.monotonic() + 180
            while True:
                shot = _screenshot(page, tmp_path, "ohif-segmentation.png")
                if _overlay_pixels(shot) > before + 1000:
                    break
                assert time.monotonic() < deadline, f"no segmentation drawn: see {shot}; page errors {errors}"
                page.wait_for_timeout(500)
        finally:
            browser.close()
    assert not errors, f"page errors: {errors}"
