"""GET /ohif/: MONAI Label's built OHIF viewer from the installed wheel, as the gateway serves it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.routes.ohif import wheel_ohif_dir
from tests.fixtures.gateway import GatewayStack, offline_app
from tests.fixtures.orthanc import Orthanc


@pytest.fixture(scope="module")
def ohif_stack(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc) -> Iterator[GatewayStack]:
    stack = GatewayStack(
        tmp_path_factory.mktemp("ohif"), gateway_overrides={"dicomweb_url": orthanc.dicomweb_url}
    ).start()
    yield stack
    stack.stop()


def test_the_wheel_ships_the_build() -> None:
    root = wheel_ohif_dir()
    assert root is not None, "monailabel==0.8.5 (installed --no-deps) must provide static/ohif"
    assert (root / "index.html").is_file() and (root / "app-config.js").is_file()


def test_entry_page_and_spa_fallback_are_index_html(ohif_stack: GatewayStack) -> None:
    index = (wheel_ohif_dir() / "index.html").read_bytes()  # type: ignore[operator]
    for path in ("/ohif/", "/ohif/index.html", "/ohif/viewer?StudyInstanceUIDs=1.2.3", "/ohif/local/no/such/route"):
        answer = httpx.get(ohif_stack.url + path)
        assert answer.status_code == 200, path
        assert answer.headers["content-type"].startswith("text/html"), path
        assert answer.content == index, path
    redirect = httpx.get(ohif_stack.url + "/ohif")
    assert redirect.status_code == 307 and redirect.headers["location"] == "/ohif/"


def test_assets_have_their_types_and_bytes(ohif_stack: GatewayStack) -> None:
    root = wheel_ohif_dir()
    assert root is not None
    wasm = sorted(root.glob("*.wasm"))[0]
    answer = httpx.get(f"{ohif_stack.url}/ohif/{wasm.name}")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/wasm"
    assert answer.content == wasm.read_bytes()

    config = httpx.get(f"{ohif_stack.url}/ohif/app-config.js")
    assert config.status_code == 200
    assert config.headers["content-type"].startswith("text/javascript")
    assert "/proxy/dicom/qido" in config.text and "routerBasename: '/ohif/'" in config.text

    # Every script the entry page loads is served as JavaScript (a module script with a wrong
    # type is refused by the browser).
    scripts = re.findall(r'src="(/ohif/[^"]+\.js)"', (root / "index.html").read_text())
    assert scripts
    for src in scripts:
        answer = httpx.get(ohif_stack.url + src)
        assert answer.status_code == 200, src
        assert answer.headers["content-type"].startswith("text/javascript"), src
    css = sorted(root.glob("*.css"))[0]
    assert httpx.get(f"{ohif_stack.url}/ohif/{css.name}").headers["content-type"].startswith("text/css")


@pytest.mark.parametrize(
    "path",
    [
        "/ohif/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/ohif/..%2f..%2f..%2fetc%2fpasswd",
        "/ohif/assets/%2e%2e/%2e%2e/app-config.js",
        "/ohif/a%5c..%5c..%5cetc%5cpasswd",
        "/ohif/x%00.js",
    ],
)
def test_path_traversal_is_refused(ohif_stack: GatewayStack, path: str) -> None:
    # Sent as raw bytes: httpx would otherwise normalise the dots away before sending.
    with httpx.Client() as client:
        request = client.build_request("GET", ohif_stack.url + "/")
        request.url = request.url.copy_with(raw_path=path.encode())
        answer = client.send(request)
    assert answer.status_code == 400
    assert "root:" not in answer.text


def test_a_symlink_out_of_the_build_is_not_followed(tmp_path: Path) -> None:
    build = tmp_path / "ohif"
    build.mkdir()
    (build / "index.html").write_text("<html>entry</html>")
    (build / "app.js").write_text("console.log(1)")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    (build / "leak.js").symlink_to(secret)
    with offline_app(ohif_dir=str(build), dicomweb_url="http://127.0.0.1:9/dicom-web") as client:
        assert client.get("/ohif/app.js").text == "console.log(1)"
        answer = client.get("/ohif/leak.js")
        assert answer.status_code == 200 and answer.text == "<html>entry</html>"


def test_without_a_dicomweb_source_the_entry_page_says_ohif_needs_one() -> None:
    with offline_app() as client:
        answer = client.get("/ohif/")
        assert answer.status_code == 503
        assert answer.headers["content-type"].startswith("text/html")
        assert "OHIF needs a DICOMweb source" in answer.text and "--studies http://" in answer.text
        assert client.get("/ohif/viewer").status_code == 503
        # Assets stay available (nothing secret in them).
        assert client.get("/ohif/app-config.js").status_code == 200


def test_a_missing_build_is_a_clear_503(tmp_path: Path) -> None:
    with offline_app(ohif_dir=str(tmp_path / "nothing"), dicomweb_url="http://127.0.0.1:9/x") as client:
        answer = client.get("/ohif/")
        assert answer.status_code == 503
        assert "monailabel==0.8.5" in answer.json()["detail"]
