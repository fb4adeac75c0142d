"""The clients in other languages (clients/go, clients/java, clients/node) and the Python SDK's
CLI, built from protos/ and run against `labelgrid up` through its one Envoy port.

Each client does a user's whole flow: list the models, upload a NIfTI file as a chunk stream
with its sha256, run inference on it (keeping the result as a label), stream the label to a
file and verify its sha256, download the stored label again, and ask for the next sample.
What each one gets must equal what the Python SDK (labelgrid.client) gets for the same request:
the same models, the same label bytes (sha256) and the same label volume (shape and voxels).

Go and Java are generated with Debian's protoc and plugins and built by clients/build.py
(cached in build/clients by a hash of the protos and sources); Node runs the code protoc-gen-es
generated (checked for freshness by test_node_client.py), once over native gRPC and once over
gRPC-web (a browser's path). A missing toolchain FAILS these tests with the command that
installs it (`make install-go install-java`, part of `make test`); nothing is skipped.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from labelgrid.client import Client

from tests.fixtures.labelgrid_up import Stack, start_stack, stop_stack

pytestmark = pytest.mark.timeout(420)

REPO = Path(__file__).resolve().parents[2]
MODEL = "segmentation"
SHAPE = (24, 20, 16)
INSTALL = "run `make install-go install-java` (Debian packages; part of `make test`)"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("clients-stack"), sample_studies=False, ready_timeout=180)
    yield running
    stop_stack(running)


@pytest.fixture(scope="module")
def target(stack: Stack) -> str:
    return f"127.0.0.1:{stack.port}"


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small NIfTI volume with two blobs the sample segmentation model labels."""
    data = np.zeros(SHAPE, dtype=np.float32)
    data[4:12, 4:12, 4:12] = 1.0
    data[14:20, 12:18, 8:14] = 2.0
    path = tmp_path_factory.mktemp("volume") / "scan.nii.gz"
    path.write_bytes(gzip.compress(nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0])).to_bytes(), mtime=0))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def voxels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@dataclass
class Reference:
    """What the Python SDK gets for the flow every client runs."""

    models: list[str]
    label_sha256: str
    label: np.ndarray


@pytest.fixture(scope="module")
def reference(target: str, volume: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    out = tmp_path_factory.mktemp("sdk")
    with Client(target) as client:
        models = [m.model_id for m in client.list_models()]
        image = client.upload_image(volume, "ref_sdk")
        assert image.sha256 == sha256(volume)
        result = client.infer(MODEL, "ref_sdk", out / "label.nii.gz", save_label_tag="sdk")
        assert result.label is not None and result.saved_label == "images/ref_sdk/labels/sdk"
        stored = client.download_label("ref_sdk", "sdk", out / "stored.nii.gz")
    assert result.label.sha256 == sha256(result.label.path) == stored.sha256
    label = voxels(result.label.path)
    assert label.shape == SHAPE and set(np.unique(label)) <= {0, 1, 2}
    return Reference(models, result.label.sha256, label)


def build(language: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(REPO / "clients" / "build.py"), language],
        capture_output=True, text=True, timeout=400, check=False, cwd=REPO,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"the {language} client did not build ({INSTALL}):\n{result.stdout}{result.stderr}", pytrace=False)
    return list(json.loads(result.stdout.strip().splitlines()[-1])["argv"])


@pytest.fixture(scope="module", params=["go", "java", "node-grpc", "node-grpc-web"])
def client(request: pytest.FixtureRequest, target: str, stack: Stack) -> tuple[str, list[str]]:
    """(name, argv prefix) of a built client pointed at the stack's edge."""
    name = request.param
    if name.startswith("node"):
        node_binary = request.getfixturevalue("node")
        transport = name.removeprefix("node-")
        argv = [node_binary, str(REPO / "clients" / "node" / "labelgrid_client.mjs"),
                "--url", stack.url, "--transport", transport]  # fmt: skip
    else:
        argv = [*build(name), "--target", target]
    return name, argv


def call(argv: list[str], *args: str, cwd: Path) -> list[dict[str, Any]]:
    result = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd)
    assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_client_flow_matches_the_sdk(
    client: tuple[str, list[str]], target: str, reference: Reference, volume: Path, tmp_path: Path
) -> None:
    name, argv = client
    image_id = f"scan_{name.replace('-', '_')}"

    models = call(argv, "models", cwd=tmp_path)
    assert [m["model"] for m in models] == reference.models
    assert MODEL in reference.models

    (uploaded,) = call(argv, "upload", "--file", str(volume), "--image-id", image_id, cwd=tmp_path)
    assert uploaded["image"] == image_id
    assert uploaded["sha256"] == sha256(volume) and uploaded["size_bytes"] == volume.stat().st_size

    label = tmp_path / "label.nii.gz"
    (inferred,) = call(argv, "infer", "--model", MODEL, "--image", image_id, "--out", str(label),
                       "--save-tag", "client", cwd=tmp_path)  # fmt: skip
    assert inferred["saved_label"] == f"images/{image_id}/labels/client"
    assert inferred["label_names"] == {"sphere_a": 1, "sphere_b": 2}
    assert inferred["sha256"] == sha256(label) == reference.label_sha256
    got = voxels(label)
    assert got.shape == reference.label.shape == SHAPE
    assert np.array_equal(got, reference.label)

    stored = tmp_path / "stored.nii.gz"
    (downloaded,) = call(argv, "download-label", "--image", image_id, "--tag", "client", "--out", str(stored),
                         cwd=tmp_path)  # fmt: skip
    assert downloaded["sha256"] == sha256(stored) == reference.label_sha256
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "a temp file was left behind"

    # The datastore holds the label under the tag the client asked for, with the same sha256.
    with Client(target) as sdk:
        labels = {label.tag: label.sha256 for label in sdk.get_image(image_id).labels}
    assert labels["client"] == reference.label_sha256


def test_client_next_sample(client: tuple[str, list[str]], target: str, reference: Reference, tmp_path: Path) -> None:
    """NextSample (active learning) through the edge: the image handed out is one of the
    datastore's, leased to this client; asked again, the same client gets its lease back."""
    name, argv = client
    client_id = f"annotator-{name}"
    (sample,) = call(argv, "next-sample", "--client-id", client_id, "--strategy", "random", cwd=tmp_path)
    with Client(target) as sdk:
        images = {image.image_id for image in sdk.list_images()}
    assert "ref_sdk" in images
    assert sample["image"] in images, sample
    assert sample["lease_expire_time"], sample


def test_client_errors_are_clean(client: tuple[str, list[str]], tmp_path: Path) -> None:
    """An unknown image is a NOT_FOUND error line and exit status 1; a missing file a local
    error; bad usage exit status 2 — never a stack trace."""
    _, argv = client
    result = subprocess.run([*argv, "infer", "--model", MODEL, "--image", "no_such_image", "--out", "x.nii.gz"],
                            capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    error = json.loads(result.stderr.strip().splitlines()[-1])["error"]
    assert str(error.get("codeName", error["code"])).upper().replace("_", "") == "NOTFOUND", error
    assert not (tmp_path / "x.nii.gz").exists()

    result = subprocess.run([*argv, "upload", "--file", str(tmp_path / "missing.nii.gz")],
                            capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "missing.nii.gz" in json.loads(result.stderr.strip().splitlines()[-1])["error"]["message"]

    result = subprocess.run([*argv, "no-such-command"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    for output in (result.stdout, result.stderr):
        assert "Traceback" not in output and "Exception in thread" not in output


# -- the Python SDK's own CLI (`labelgrid ...`) on the same stack -------------------------------


def labelgrid(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                          timeout=120, check=False, cwd=cwd, env={**os.environ, **(env or {})})  # fmt: skip


def test_labelgrid_cli_flow(target: str, reference: Reference, volume: Path, tmp_path: Path) -> None:
    env = {"LABELGRID_TARGET": target}

    def ok(*args: str) -> list[dict[str, Any]]:
        result = labelgrid(*args, "--json", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    assert [m["model"] for m in ok("models", "list")] == reference.models
    (uploaded,) = ok("images", "upload", str(volume), "--id", "scan_cli")
    assert uploaded == {"image": "scan_cli", "size_bytes": volume.stat().st_size, "sha256": sha256(volume)}
    assert "scan_cli" in {image["image"] for image in ok("images", "list")}
    (inferred,) = ok("infer", MODEL, "scan_cli", "-o", str(tmp_path / "cli.nii.gz"), "--save-label", "cli")
    assert inferred["sha256"] == sha256(tmp_path / "cli.nii.gz") == reference.label_sha256
    (_,) = ok("infer", MODEL, str(volume), "--file", "-o", str(tmp_path / "file.nii.gz"))
    assert np.array_equal(voxels(tmp_path / "file.nii.gz"), reference.label)
    (downloaded,) = ok("labels", "download", "scan_cli", "--tag", "cli", "-o", str(tmp_path / "stored.nii.gz"))
    assert downloaded["sha256"] == reference.label_sha256


def test_labelgrid_cli_next_sample(target: str, reference: Reference, tmp_path: Path) -> None:
    result = labelgrid("next-sample", "--client-id", "annotator-cli", "--json", "--target", target, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    sample = json.loads(result.stdout)
    with Client(target) as sdk:
        assert sample["image"] in {image.image_id for image in sdk.list_images()}
    assert sample["lease_expire_time"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("images", "upload", "missing.nii.gz"), "no such file: missing.nii.gz"),
        (("labels", "download", "no_such_image"), "NOT_FOUND"),
        (("infer", MODEL, "no_such_image"), "IMAGE_NOT_FOUND"),
        (("infer", "no_such_model", "ref_sdk"), "NOT_FOUND"),
        (("infer", MODEL, "ref_sdk", "--params", "[1]"), "--params must be a JSON object"),
    ],
)
def test_labelgrid_cli_bad_input(
    target: str, reference: Reference, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = labelgrid(*args, "--target", target, "--no-progress", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("labelgrid: error: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir()), "nothing may be written on failure"
