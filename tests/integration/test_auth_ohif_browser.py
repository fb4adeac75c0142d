"""OHIF with auth on, in a real browser (Debian's Chromium driven by Playwright, as
test_ohif_browser.py): opening /ohif/ leads to the sign-in page; after signing in, the session
cookie alone carries the viewer's QIDO calls through the DICOMweb proxy and the MONAI Label
panel's connect (/info/) and segmentation (POST /infer/..., which Chromium sends with its own
Origin), against a real Orthanc, datastore and inference service with auth on."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from playwright.sync_api import sync_playwright

from services.common.auth import USER, UsersFile, new_signing_key
from tests.fixtures.browser import CHROMIUM
from tests.fixtures.gateway import GatewayStack, real_inference
from tests.fixtures.orthanc import CtSeries, Orthanc, ct_series

pytestmark = pytest.mark.timeout(600)

KEY = new_signing_key()
GATEWAY_TOKEN = "gateway-service-token-" + "g" * 20
INFERENCE_TOKEN = "inference-service-token-" + "i" * 20


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc) -> Iterator[tuple[GatewayStack, CtSeries]]:
    patient = f"AUTHOHIF-{uuid.uuid4().hex[:8]}"
    series = ct_series(slices=6, rows=64, columns=64, seed=43, patient_id=patient)
    orthanc.upload(series.datasets)
    root = tmp_path_factory.mktemp("auth-ohif-browser")
    users = UsersFile()
    users.add("uma", "uma-pw", [USER])
    users.save(root / "users.json")
    auth = {"auth_signing_key": KEY, "auth_services": [f"gateway={GATEWAY_TOKEN}", f"inference={INFERENCE_TOKEN}"]}
    stack = GatewayStack(
        root,
        start_inference=real_inference(root / "infer", **auth, auth_service_token=INFERENCE_TOKEN),
        datastore_overrides={
            **auth, "backend": "dicomweb", "dicomweb_url": orthanc.dicomweb_url,
            "dicomweb_search_filter": json.dumps({"Modality": "CT", "PatientID": patient}), "dicomweb_sync_seconds": 0,
        },
        gateway_overrides={
            **auth, "dicomweb_url": orthanc.dicomweb_url, "auth_users_file": root / "users.json",
            "auth_service_token": GATEWAY_TOKEN,
        },
    ).start()  # fmt: skip
    yield stack, series
    stack.stop()


def test_ohif_signs_in_and_segments_with_the_session_only(case: tuple[GatewayStack, CtSeries]) -> None:
    stack, series = case
    calls: list[tuple[str, int]] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
        )
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            page.on(
                "response", lambda r: calls.append((f"{r.request.method} {r.url.removeprefix(stack.url)}", r.status))
            )
            page.goto(f"{stack.url}/ohif/", timeout=120_000)
            assert page.url.startswith(f"{stack.url}/auth/login?next=")
            page.fill("input[name=username]", "uma")
            page.fill("input[name=password]", "uma-pw")
            with page.expect_navigation(timeout=120_000):
                page.click("button[type=submit]")
            assert page.url == f"{stack.url}/ohif/"
            cookies = {cookie["name"]: cookie for cookie in page.context.cookies()}
            session = cookies["labelgrid_session"]
            assert session["httpOnly"] and session["sameSite"] == "Strict"
            assert page.evaluate("() => document.cookie").find("labelgrid_session") == -1  # not for scripts

            page.get_by_text(series.datasets[0].PatientID).first.wait_for(timeout=180_000)
            assert any(call.startswith("GET /proxy/dicom/qido/studies") and status == 200 for call, status in calls)

            page.goto(f"{stack.url}/ohif/monai-label?StudyInstanceUIDs={series.study_uid}", timeout=120_000)
            connect = page.locator(".monaiLabelPanel button.actionButton").first
            connect.wait_for(timeout=180_000)
            with page.expect_response(lambda r: r.url.startswith(f"{stack.url}/info/"), timeout=120_000) as info:
                connect.click(force=True)
            assert info.value.status == 200
            run = page.get_by_title("Run Segmentation", exact=True)
            run.wait_for(timeout=120_000)
            page.wait_for_function("() => document.querySelectorAll('canvas').length > 0", timeout=120_000)
            with page.expect_response(lambda r: "/infer/segmentation" in r.url, timeout=300_000) as infer:
                run.click(force=True)
            assert infer.value.status == 200, infer.value.text()
            sent = infer.value.request.all_headers()  # what the CSRF check read
            assert sent.get("origin") == stack.url and "authorization" not in sent
        finally:
            browser.close()
    assert not [call for call in calls if call[1] in (401, 403)], calls
