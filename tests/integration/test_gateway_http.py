"""Byte-level behaviour of the gateway over HTTP (httpx) against a real datastore: MONAI Label
0.8.5's slashes, headers, error shapes and CORS, and the places where labelgrid is stricter."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator

import httpx
import pytest

from tests.contract.helpers import nifti_bytes
from tests.fixtures.gateway import GatewayStack

pytestmark = pytest.mark.timeout(120)

NIFTI = nifti_bytes(seed=11)
LABEL = nifti_bytes(seed=12, dtype="uint8")


@pytest.fixture(scope="module")
def http(gateway_url: str) -> Iterator[httpx.Client]:
    # A pooled client: an error must not break the keep-alive connection for the next request.
    with httpx.Client(base_url=gateway_url, timeout=30) as client:
        yield client


def upload(
    http: httpx.Client,
    image_id: str | None,
    data: bytes = NIFTI,
    name: str = "x.nii.gz",
    params: str = "{}",
    path: str = "/datastore/image",
) -> httpx.Response:
    query = {"image": image_id} if image_id is not None else {}
    return http.put(path, params=query, data={"params": params}, files={"file": (name, data)})


def assert_json_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body.get("detail")
    return body


# -- conventions -----------------------------------------------------------------------------


def test_trailing_slash_redirects(http: httpx.Client, gateway_url: str) -> None:
    for method, path, target in [
        ("GET", "/info", "/info/"),
        ("PUT", "/datastore?image=zz", "/datastore/?image=zz"),
        ("PUT", "/session", "/session/"),
        ("GET", "/train", "/train/"),
    ]:
        response = http.request(method, path)
        assert response.status_code == 307, (path, response.status_code)
        assert response.headers["location"] == gateway_url + target


def test_not_found_and_method_not_allowed(http: httpx.Client) -> None:
    assert http.get("/nope").json() == {"detail": "Not Found"}
    response = http.get("/infer/segmentation")
    assert response.status_code == 405 and response.json() == {"detail": "Method Not Allowed"}


def test_docs_openapi_and_root(http: httpx.Client) -> None:
    assert http.get("/").status_code == 200
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert "/info/" in paths and "/datastore/label" in paths and "/infer/{model}" in paths


def test_cors_echoes_origin_with_credentials(http: httpx.Client) -> None:
    origin = "http://viewer.example"
    preflight = http.options(
        "/infer/segmentation?image=x",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == origin
    assert preflight.headers["access-control-allow-credentials"] == "true"
    simple = http.get("/info/", headers={"Origin": origin})
    assert simple.headers["access-control-allow-origin"] == origin
    assert "Origin" in simple.headers.get("vary", "")


def test_auth_route_is_public_and_off(http: httpx.Client) -> None:
    assert http.get("/auth/").json() == {
        "enabled": False,
        "client_id": "monailabel-app",
        "realm": "",
    }
    # MONAI Label's DEFAULT_USER: who every request runs as with auth off.
    assert http.get("/auth/token/valid").json() == {
        "username": "admin",
        "email": "admin@monailabel.com",
        "name": "UNK",
        "roles": ["monailabel-admin", "monailabel-reviewer", "monailabel-annotator", "monailabel-user"],
    }


def test_unavailable_routes_are_501(http: httpx.Client) -> None:
    for method, path in [
        ("POST", "/reload"),
        ("POST", "/infer/wsi_v2/segmentation"),
    ]:
        body = assert_json_error(http.request(method, path), 501)
        assert "not available yet in labelgrid" in body["detail"]


# -- datastore -------------------------------------------------------------------------------


def test_image_roundtrip_headers(http: httpx.Client) -> None:
    assert upload(http, "img_http", params='{"client_id": "c1"}').json() == {"image": "img_http"}
    response = http.get("/datastore/image", params={"image": "img_http"})
    assert response.status_code == 200
    assert response.content == NIFTI
    assert response.headers["content-disposition"] == 'attachment; filename="img_http.nii.gz"'
    assert response.headers["content-length"] == str(len(NIFTI))
    assert response.headers["content-type"] == "application/octet-stream"

    digest = hashlib.sha256(NIFTI).hexdigest()
    assert http.head("/datastore/image", params={"image": "img_http"}).status_code == 200
    assert (
        http.head(
            "/datastore/image",
            params={"image": "img_http", "check_sum": f"SHA256:{digest}"},
        ).status_code
        == 200
    )
    assert http.head("/datastore/image", params={"image": "img_http", "check_sum": digest}).status_code == 200
    assert http.head("/datastore/image", params={"image": "img_http", "check_sum": "0" * 64}).status_code == 404
    assert http.head("/datastore/image", params={"image": "nope"}).status_code == 404

    info = http.get("/datastore/image/info", params={"image": "img_http"}).json()
    assert info["client_id"] == "c1" and info["user"] == "admin" and "path" not in info
    assert (
        http.put(
            "/datastore/image/info",
            params={"image": "img_http"},
            data={"info": '{"foo": "bar"}'},
        ).json()
        is None
    )
    assert http.get("/datastore/image/info", params={"image": "img_http"}).json()["foo"] == "bar"


def test_id_from_file_name(http: httpx.Client) -> None:
    response = upload(http, None, name="/home/user/scans/fromname.v2.nii.gz")
    assert response.json() == {"image": "fromname"}


def test_label_roundtrip(http: httpx.Client) -> None:
    upload(http, "img_lab")
    response = http.put(
        "/datastore/label",
        params={"image": "img_lab", "tag": "reviewer1"},
        data={"params": json.dumps({"label_info": [{"name": "spleen", "idx": 1}]})},
        files={"label": ("/tmp/whatever/img_lab.nii.gz", LABEL)},
    )
    assert response.json() == {"image": "img_lab", "label": "img_lab"}
    got = http.get("/datastore/label", params={"label": "img_lab", "tag": "reviewer1"})
    assert got.content == LABEL
    assert got.headers["content-disposition"] == 'attachment; filename="img_lab.nii.gz"'
    assert http.head("/datastore/label", params={"image": "img_lab", "tag": "reviewer1"}).status_code == 200
    assert http.head("/datastore/label", params={"image": "img_lab", "tag": "final"}).status_code == 404

    assert (
        http.put(
            "/datastore/updatelabelinfo",
            params={"label": "img_lab", "tag": "reviewer1"},
            data={"params": '{"approved": true}'},
        ).json()
        is None
    )
    info = http.get("/datastore/label/info", params={"label": "img_lab", "tag": "reviewer1"}).json()
    assert info["approved"] is True and info["label_info"] == [{"name": "spleen", "idx": 1}]
    assert http.get("/datastore/label/info", params={"label": "img_lab", "tag": "nope"}).json() == {}

    assert http.delete("/datastore/label", params={"id": "img_lab", "tag": "reviewer1"}).json() == {}
    assert http.delete("/datastore/label", params={"id": "img_lab", "tag": "reviewer1"}).json() == {}
    assert_json_error(
        http.get("/datastore/label", params={"label": "img_lab", "tag": "reviewer1"}),
        404,
    )


def test_train_datalist_and_dataset_zip(http: httpx.Client) -> None:
    upload(http, "img_train")
    http.put(
        "/datastore/label",
        params={"image": "img_train"},
        data={"params": "{}"},
        files={"label": ("l.nii.gz", LABEL)},
    )
    datalist = http.get("/datastore/", params={"output": "train"}).json()
    entry = next(item for item in datalist if "img_train" in item["image"])
    assert entry["image"].startswith(str(http.base_url))
    assert http.get(entry["image"]).content == NIFTI
    assert http.get(entry["label"]).content == LABEL

    stats = http.get("/datastore/").json()
    assert stats == http.get("/datastore/", params={"output": "stats"}).json()
    assert stats["completed"] >= 1 and stats["label_tags"]["final"] >= 1

    archive = http.get("/datastore/dataset", params={"limit_cases": 0})
    assert archive.status_code == 200
    assert archive.headers["content-disposition"] == 'attachment; filename="dataset.zip"'
    names = zipfile.ZipFile(io.BytesIO(archive.content)).namelist()
    assert "metadata.json" in names


def test_delete_image(http: httpx.Client) -> None:
    upload(http, "img_del")
    assert http.delete("/datastore/image", params={"id": "img_del"}).json() == {}
    assert_json_error(http.get("/datastore/image", params={"image": "img_del"}), 404)
    assert_json_error(http.delete("/datastore/image", params={"id": "img_del"}), 404)
    assert http.get("/datastore/image/info", params={"image": "img_del"}).json() == {}


# -- stricter than MONAI Label -----------------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["../x", "a/b", "..", ".hidden", "a\\b", "x" * 300, "session-abc"])
def test_path_like_or_reserved_ids_are_400(http: httpx.Client, bad_id: str) -> None:
    assert_json_error(upload(http, bad_id), 400)


def test_bad_ids_and_tags_everywhere(http: httpx.Client) -> None:
    upload(http, "img_ok")
    assert_json_error(
        http.put(
            "/datastore/label",
            params={"image": "img_ok", "tag": "../x"},
            data={"params": "{}"},
            files={"label": ("l.nii.gz", LABEL)},
        ),
        400,
    )
    assert_json_error(http.get("/datastore/image", params={"image": "../../etc/passwd"}), 400)
    assert_json_error(
        http.get("/datastore/label", params={"label": "img_ok", "tag": "a/labels/b"}),
        400,
    )
    assert_json_error(http.delete("/datastore/image", params={"id": "../img_ok"}), 400)
    assert_json_error(http.get("/datastore/image/info", params={"image": "a/b"}), 400)


@pytest.mark.parametrize(
    "name,data",
    [
        ("notes.txt", b"hello, I am text"),
        ("garbage.nii.gz", b"\x00\x01garbage" * 100),
        ("truncated.nii.gz", NIFTI[: len(NIFTI) // 2]),
        ("empty.nii.gz", b""),
    ],
)
def test_bad_files_are_refused(http: httpx.Client, name: str, data: bytes) -> None:
    assert_json_error(upload(http, "img_bad", data=data, name=name), 422)
    assert http.head("/datastore/image", params={"image": "img_bad"}).status_code == 404


@pytest.mark.parametrize("params", ["{not json", "[1, 2]", '"text"'])
def test_invalid_params_json_is_422(http: httpx.Client, params: str) -> None:
    body = assert_json_error(upload(http, "img_params", params=params), 422)
    assert body["detail"][0]["loc"] == ["body", "params"]
    upload(http, "img_params")
    assert_json_error(
        http.put(
            "/datastore/image/info",
            params={"image": "img_params"},
            data={"info": params},
        ),
        422,
    )


def test_unknown_ids_are_404(http: httpx.Client) -> None:
    assert_json_error(
        http.put(
            "/datastore/label",
            params={"image": "nope"},
            data={"params": "{}"},
            files={"label": ("l.nii.gz", LABEL)},
        ),
        404,
    )
    assert_json_error(
        http.put("/datastore/image/info", params={"image": "nope"}, data={"info": "{}"}),
        404,
    )
    assert_json_error(
        http.put(
            "/datastore/label/info",
            params={"label": "nope", "tag": "final"},
            data={"info": "{}"},
        ),
        404,
    )


def test_missing_fields_are_422(http: httpx.Client) -> None:
    assert http.put("/datastore/image", params={"image": "x"}, data={"params": "{}"}).status_code == 422
    assert http.get("/datastore/image").status_code == 422
    assert http.get("/datastore/", params={"output": "bogus"}).status_code == 422


# -- sessions ----------------------------------------------------------------------------------


def test_session_lifecycle(http: httpx.Client) -> None:
    created = http.put(
        "/session/",
        params={"expiry": 60},
        data={"client_id": "c"},
        files={"files": ("local.nii.gz", NIFTI)},
    )
    assert created.status_code == 200, created.text
    body = created.json()
    session_id = body["session_id"]
    assert body["session_info"]["expiry"] == 60
    got = http.get(f"/session/{session_id}", params={"image": "true"})
    assert got.content == NIFTI and "filename=" in got.headers["content-disposition"]
    assert http.get(f"/session/{session_id}", params={"update_ts": "true"}).json()["name"] == session_id
    assert all(
        not key.startswith("session-") for key in http.get("/datastore/", params={"output": "all"}).json()["objects"]
    )
    assert http.delete(f"/session/{session_id}").status_code == 200
    assert_json_error(http.get(f"/session/{session_id}"), 404)
    assert_json_error(http.delete(f"/session/{session_id}"), 404)
    assert_json_error(http.get("/session/not-a-uuid"), 404)
    assert_json_error(http.get("/session/..%2F..%2Fetc"), 404)


def test_session_with_several_files(http: httpx.Client) -> None:
    # Several files become one ZIP (a DICOM series); NIfTI files in a ZIP are not a series,
    # so the datastore refuses it and nothing is left behind.
    before = http.get("/datastore/", params={"output": "all"}).json()["objects"]
    response = http.put(
        "/session/",
        files=[("files", ("a.nii.gz", NIFTI)), ("files", ("b.nii.gz", NIFTI))],
    )
    assert_json_error(response, 422)
    assert http.get("/datastore/", params={"output": "all"}).json()["objects"] == before


def test_bad_session_uploads(http: httpx.Client) -> None:
    assert_json_error(http.put("/session/", files={"files": ("x.nii.gz", b"")}), 422)
    assert_json_error(http.put("/session/", files={"files": ("x.nii.gz", b"junk" * 10)}), 422)
    assert http.put("/session/", data={"client_id": "c"}).status_code == 422


@pytest.fixture(scope="module")
def no_sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    stack = GatewayStack(tmp_path_factory.mktemp("nosessions"), {"sessions_enabled": False}).start()
    yield stack.url
    stack.stop()


def test_sessions_disabled_is_406(no_sessions: str) -> None:
    response = httpx.put(no_sessions + "/session/", files={"files": ("x.nii.gz", NIFTI)})
    assert response.status_code == 406 and response.json() == {"detail": "Session Feature is Not Enabled"}


# -- infer without an inference service ------------------------------------------------------


def test_infer_without_inference_service_is_503(http: httpx.Client) -> None:
    upload(http, "img_inf")
    body = assert_json_error(
        http.post("/infer/segmentation", params={"image": "img_inf"}, data={"params": "{}"}),
        503,
    )
    assert "inference service is not reachable" in body["detail"]
    body = assert_json_error(
        http.post(
            "/infer/segmentation",
            params={"image": ""},
            data={"params": "{}"},
            files={"file": ("f.nii.gz", NIFTI)},
        ),
        503,
    )


def test_infer_bad_requests(http: httpx.Client) -> None:
    assert_json_error(http.post("/infer/segmentation", data={"params": "{}"}), 400)
    assert_json_error(http.post("/infer/segmentation", params={"image": "../../etc/passwd"}), 400)
    assert_json_error(http.post("/infer/segmentation", params={"image": "/etc/passwd"}), 400)
    assert_json_error(http.post("/infer/..%2Fx", params={"image": "img_inf"}), 404)
    assert_json_error(
        http.post("/infer/segmentation", params={"image": "x"}, data={"params": "{nope"}),
        422,
    )
    assert_json_error(
        http.post(
            "/infer/segmentation",
            params={"image": "x"},
            data={"params": '{"foreground": [[1, 2]]}'},
        ),
        422,
    )
    assert_json_error(
        http.post("/infer/segmentation", params={"image": "x", "session_id": "nope"}),
        404,
    )
    assert http.post("/infer/segmentation", params={"image": "x", "output": "bogus"}).status_code == 422
    assert_json_error(
        http.post("/infer/segmentation", params={"image": "x", "output": "dicom_seg"}),
        501,
    )


def test_info_counts_follow_the_datastore(http: httpx.Client) -> None:
    info = http.get("/info/").json()
    assert info["datastore"] == http.get("/datastore/").json()
    assert "config" not in info
