"""MONAI Bundles with auth on: `labelgrid up --auth-users FILE --bundle PATH` serves the bundle
(only the training service may publish model versions: it stores the bundle, the other
services wait for it), and only an admin may add one through PUT /model/{name}: a bundle is code.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.common.auth import ADMIN, ANNOTATOR, UsersFile
from tests.fixtures.bundles import make_bundle, zip_folder
from tests.integration.test_labelgrid_up import Stack, start_stack, stop_stack

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("bundle-auth")
    users = UsersFile()
    users.add("alice", "alice-pw", [ADMIN])
    users.add("ann", "ann-pw", [ANNOTATOR])
    users.save(root / "users.json")
    bundle = make_bundle(root / "bundles" / "ct_auth", seed=5, train=False)
    running = start_stack(root, sample_studies=False, extra=["--auth-users", str(root / "users.json"), "--bundle", str(bundle)])
    yield running
    stop_stack(running)


def token(stack: Stack, username: str) -> dict[str, str]:
    response = httpx.post(f"{stack.url}/auth/token", data={"username": username, "password": f"{username}-pw"}, timeout=30)
    assert response.status_code == 200, response.text
    return {"authorization": f"Bearer {response.json()['access_token']}"}


def test_the_bundle_is_served_with_auth_on(stack: Stack) -> None:
    info = httpx.get(f"{stack.url}/info/", headers=token(stack, "ann"), timeout=30).json()
    assert info["models"]["ct_auth"]["labels"] == {"organ_a": 1, "organ_b": 2}


def test_only_an_admin_adds_a_bundle(stack: Stack, tmp_path: Path) -> None:
    archive = zip_folder(make_bundle(tmp_path / "src" / "ct_put", seed=6, train=False), tmp_path / "ct_put.zip")
    files = {"file": ("ct_put.zip", archive.read_bytes(), "application/zip")}
    refused = httpx.put(f"{stack.url}/model/ct_put", files=files, headers=token(stack, "ann"), timeout=120)
    assert refused.status_code == 403, refused.text
    assert "admin" in refused.json()["detail"]
    admin = token(stack, "alice")
    assert httpx.get(f"{stack.url}/model/ct_put", headers=admin, timeout=30).status_code == 404  # nothing stored
    added = httpx.put(f"{stack.url}/model/ct_put", files=files, headers=admin, timeout=120)
    assert added.status_code == 200, added.text
    assert httpx.get(f"{stack.url}/model/ct_put", headers=admin, timeout=30).content == archive.read_bytes()
