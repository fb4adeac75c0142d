"""OHIF with auth on: the same-origin browser session (gateway.auth, POST /auth/login).

OHIF (served at /ohif/) sends no Authorization header; after signing in at /auth/login the
browser holds an HttpOnly, SameSite=Strict cookie with the user's access token. These tests
replay OHIF's calls (the viewer's assets, QIDO through the DICOMweb proxy to a real Orthanc, the
MONAI Label panel's info / infer / next sample / train, a label save) with that cookie only,
against a real gateway, datastore and inference service with auth on: the role table still
holds, the services see the user (not the gateway), and a cookie from another origin, or a change
without Origin or Referer, is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from urllib.parse import unquote

import httpx
import pytest

from services.common.auth import ANNOTATOR, USER, Identity, UsersFile, issue_access_token, new_signing_key
from tests.contract.helpers import nifti_bytes
from tests.fixtures.gateway import GatewayStack, real_inference
from tests.fixtures.orthanc import Orthanc, ct_series

pytestmark = pytest.mark.timeout(240)

KEY = new_signing_key()
GATEWAY_TOKEN = "gateway-service-token-" + "g" * 20
INFERENCE_TOKEN = "inference-service-token-" + "i" * 20
SERVICES = [f"gateway={GATEWAY_TOKEN}", f"inference={INFERENCE_TOKEN}"]
PASSWORDS = {"annie": "annie-pw", "uma": "uma-pw"}
PAGE = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc) -> Iterator[GatewayStack]:
    root = tmp_path_factory.mktemp("auth-ohif")
    users = UsersFile()
    users.add("annie", PASSWORDS["annie"], [ANNOTATOR])
    users.add("uma", PASSWORDS["uma"], [USER])
    users.save(root / "users.json")
    orthanc.upload(ct_series(slices=2, rows=16, columns=16, seed=7, patient_id="AUTH-OHIF").datasets)
    auth = {"auth_signing_key": KEY, "auth_services": SERVICES}
    running = GatewayStack(
        root,
        # Auth on in the inference service too: it checks the caller and reads as itself.
        start_inference=real_inference(root / "infer", **auth, auth_service_token=INFERENCE_TOKEN),
        gateway_overrides={
            **auth, "auth_users_file": root / "users.json", "auth_service_token": GATEWAY_TOKEN,
            "dicomweb_url": orthanc.dicomweb_url,
        },
        datastore_overrides=auth,
    ).start()  # fmt: skip
    token = issue_access_token(Identity("annie", frozenset({ANNOTATOR, USER})), KEY, 300)
    upload = httpx.put(
        f"{running.url}/datastore/image",
        params={"image": "ohifimg"},
        files={"file": ("ohifimg.nii.gz", nifti_bytes(seed=3))},
        headers={"authorization": f"Bearer {token}"},
        timeout=60,
    )
    assert upload.status_code == 200, upload.text
    yield running
    running.stop()


@contextlib.contextmanager
def browser(stack: GatewayStack, username: str) -> Iterator[httpx.Client]:
    """A client that behaves as OHIF's page does: the session cookie, its own Origin on changes."""
    with httpx.Client(base_url=stack.url, timeout=120) as client:
        answer = client.post(
            "/auth/login",
            data={"username": username, "password": PASSWORDS[username], "next": "/ohif/"},
            headers={"origin": stack.url},
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/ohif/", answer.text
        assert "labelgrid_session" in client.cookies
        yield client


def same_origin(stack: GatewayStack) -> dict[str, str]:
    return {"origin": stack.url}


def test_opening_ohif_without_a_session_leads_to_the_login_page(stack: GatewayStack) -> None:
    answer = httpx.get(f"{stack.url}/ohif/viewer?StudyInstanceUIDs=1.2", headers=PAGE)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/auth/login?next=%2Fohif%2Fviewer%3FStudyInstanceUIDs%3D1.2"
    page = httpx.get(f"{stack.url}{answer.headers['location']}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<form method="post" action="/auth/login">' in page.text
    assert 'name="next" value="/ohif/viewer?StudyInstanceUIDs=1.2"' in page.text
    # Not a browser page (an asset, a script): a plain 401, as on every protected route.
    assert httpx.get(f"{stack.url}/ohif/app-config.js").status_code == 401
    assert httpx.get(f"{stack.url}/proxy/dicom/qido/studies", headers=PAGE).status_code == 401


def test_login_sets_a_strict_httponly_session_cookie(stack: GatewayStack) -> None:
    form = {"username": "uma", "password": PASSWORDS["uma"], "next": "/ohif/?x=1"}
    answer = httpx.post(f"{stack.url}/auth/login", data=form, headers=same_origin(stack))
    assert answer.status_code == 303 and answer.headers["location"] == "/ohif/?x=1"
    cookies = {value.split("=", 1)[0].lower(): value.lower() for value in answer.headers.get_list("set-cookie")}
    session = cookies["labelgrid_session"]
    assert "httponly" in session and "samesite=strict" in session and "path=/" in session
    assert "secure" not in session  # plain http here
    max_age = int(session.split("max-age=")[1].split(";")[0])
    assert 0 < max_age <= 900
    # OHIF's panel takes its server from this cookie: the gateway itself, same origin.
    server = unquote(cookies["monailabel_server_url"].split(";")[0].split("=", 1)[1])
    assert server == f"{stack.url}/".lower()
    # Behind TLS (a proxy says so, or the browser's Origin is https) the cookie is Secure.
    tls = httpx.post(f"{stack.url}/auth/login", data=form, headers={"x-forwarded-proto": "https"})
    assert "secure" in tls.headers["set-cookie"].lower().split("labelgrid_session=")[1].split(",")[0]


@pytest.mark.parametrize(
    "form, headers, status",
    [
        ({"username": "uma", "password": "wrong"}, {}, 401),
        ({"username": "nobody", "password": "uma-pw"}, {}, 401),
        ({"username": "uma", "password": "uma-pw"}, {"origin": "http://evil.example"}, 403),
    ],
)
def test_a_refused_login_sets_no_cookie(
    stack: GatewayStack, form: dict[str, str], headers: dict[str, str], status: int
) -> None:
    answer = httpx.post(f"{stack.url}/auth/login", data=form, headers=headers)
    assert answer.status_code == status
    assert "labelgrid_session" not in answer.headers.get("set-cookie", "")


@pytest.mark.parametrize(
    "target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:alert(1)"]
)
def test_login_redirects_only_to_this_server(stack: GatewayStack, target: str) -> None:
    form = {"username": "uma", "password": PASSWORDS["uma"], "next": target}
    answer = httpx.post(f"{stack.url}/auth/login", data=form, headers=same_origin(stack))
    assert answer.status_code == 303 and answer.headers["location"] == "/ohif/"


def test_ohifs_calls_work_with_the_session_only(stack: GatewayStack) -> None:
    with browser(stack, "annie") as ohif:
        assert ohif.get("/ohif/", headers=PAGE).status_code == 200
        assert ohif.get("/ohif/app-config.js").status_code == 200
        studies = ohif.get("/proxy/dicom/qido/studies", params={"PatientID": "AUTH-OHIF"})
        assert studies.status_code == 200 and len(studies.json()) == 1
        info = ohif.get("/info/")
        assert info.status_code == 200 and "segmentation" in info.json()["models"]
        assert ohif.get("/train/", params={"check_if_running": "true"}).status_code not in (401, 403)
        assert ohif.get("/datastore/", params={"output": "all"}).json()["objects"]["ohifimg"]
        # The panel's inference: multipart params, answered with the label (output=image).
        infer = ohif.post(
            "/infer/segmentation",
            params={"image": "ohifimg", "output": "image"},
            files={"params": (None, '{"result_extension": ".nrrd", "result_dtype": "uint8"}')},
            headers=same_origin(stack),
        )
        assert infer.status_code == 200, infer.text
        assert infer.content[:4] == b"NRRD"
        # A label save reaches the datastore as annie (the gateway's own identity may not save
        # labels): the cookie's token is what the services see.
        saved = ohif.put(
            "/datastore/label",
            params={"image": "ohifimg", "tag": "final"},
            files={"label": ("ohifimg.nii.gz", nifti_bytes(seed=4, dtype="uint8"))},
            headers=same_origin(stack),
        )
        assert saved.status_code == 200, saved.text
        entry = ohif.get("/datastore/", params={"output": "all"}).json()["objects"]["ohifimg"]
        assert entry["labels"]["final"]["info"]["user"] == "annie"
        # Routes OHIF does not call need a bearer token, whatever the session's roles.
        assert ohif.put("/datastore/image", params={"image": "x"}, files={"file": ("x.nii.gz", b"x")},
                        headers=same_origin(stack)).status_code == 401  # fmt: skip
        assert (
            ohif.put("/model/segmentation", files={"file": ("m.pt", b"x")}, headers=same_origin(stack)).status_code
            == 401
        )


def test_the_session_keeps_the_role_table(stack: GatewayStack) -> None:
    with browser(stack, "uma") as ohif:
        assert ohif.get("/info/").status_code == 200
        sample = ohif.post("/activelearning/random", json={"client_id": "ohif"}, headers=same_origin(stack))
        assert sample.status_code not in (401, 403)  # no active learning service in this stack (503)
        saved = ohif.put(
            "/datastore/label",
            params={"image": "ohifimg", "tag": "final"},
            files={"label": ("l.nii.gz", nifti_bytes(seed=5, dtype="uint8"))},
            headers=same_origin(stack),
        )
        assert saved.status_code == 403  # saving labels is an annotator's right
        assert ohif.post("/train/", json={}, headers=same_origin(stack)).status_code == 403  # admin
        assert ohif.get("/logs/").status_code == 403  # admin


def test_a_session_cookie_from_another_origin_is_refused(stack: GatewayStack) -> None:
    with browser(stack, "annie") as ohif:
        url = "/infer/segmentation"
        params = {"image": "ohifimg", "output": "json"}
        evil = ohif.post(url, params=params, headers={"origin": "http://evil.example"})
        assert evil.status_code == 403 and "CSRF" in evil.json()["detail"]
        port_mate = ohif.post(url, params=params, headers={"origin": stack.url.rsplit(":", 1)[0] + ":1"})
        assert port_mate.status_code == 403  # same host, other port: another origin
        bare = ohif.post(url, params=params)
        assert bare.status_code == 403  # a change without Origin or Referer
        assert ohif.post(url, params=params, headers={"referer": "http://evil.example/ohif/"}).status_code == 403
        referer = ohif.post(
            url, params=params, headers={"referer": f"{stack.url}/ohif/viewer"}, files={"params": (None, "{}")}
        )
        assert referer.status_code == 200, referer.text
        # A cross-origin read (CORS fetch with credentials) is refused too; a top-level read is fine.
        assert (
            ohif.get("/datastore/", params={"output": "all"}, headers={"origin": "http://evil.example"}).status_code
            == 403
        )
        assert ohif.get("/info/", headers={"origin": "null"}).status_code == 403
        assert ohif.get("/info/").status_code == 200
        # A bearer token is not ambient: no origin check for it.
        token = issue_access_token(Identity("annie", frozenset({ANNOTATOR, USER})), KEY, 60)
        with_bearer = httpx.get(
            f"{stack.url}/info/", headers={"authorization": f"Bearer {token}", "origin": "http://evil.example"}
        )
        assert with_bearer.status_code == 200


@pytest.mark.parametrize(
    "value",
    [
        "not-a-token",
        issue_access_token(Identity("annie", frozenset({ANNOTATOR, USER})), new_signing_key(), 60),  # wrongly signed
        issue_access_token(Identity("annie", frozenset({ANNOTATOR, USER})), KEY, 60, now=0),  # expired
        GATEWAY_TOKEN,  # a service's token is no user session
    ],
)
def test_a_bad_session_cookie_is_401(stack: GatewayStack, value: str) -> None:
    answer = httpx.get(f"{stack.url}/info/", cookies={"labelgrid_session": value})
    assert answer.status_code == 401


def test_logout_clears_the_session(stack: GatewayStack) -> None:
    with browser(stack, "uma") as ohif:
        assert ohif.get("/info/").status_code == 200
        out = ohif.post("/auth/logout", headers=same_origin(stack))
        assert out.status_code == 303 and out.headers["location"] == "/auth/login"
        assert "labelgrid_session" not in ohif.cookies
        assert ohif.get("/info/").status_code == 401


def test_auth_off_login_page_just_goes_on(gateway_url: str) -> None:
    answer = httpx.get(f"{gateway_url}/auth/login", params={"next": "/ohif/"})
    assert answer.status_code == 303 and answer.headers["location"] == "/ohif/"
