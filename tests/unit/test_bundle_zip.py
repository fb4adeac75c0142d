"""Bundle zips are unpacked defensively and bundle folders are read strictly (apps/bundle.py), no server needed."""

from __future__ import annotations

import json
import stat
import zipfile
from pathlib import Path

import pytest

from apps.bundle import BundleError, bundle_name, extract_zip, load_bundle, open_bundle
from tests.fixtures.bundles import make_bundle, zip_folder


def _zip(path: Path, entries: dict[str, bytes], link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize(
    ("entries", "link", "words"),
    [
        ({"b/configs/metadata.json": b"{}", "../evil": b"x"}, None, "outside the bundle"),
        ({"b/configs/metadata.json": b"{}", "/abs/evil": b"x"}, None, "not a relative path"),
        ({"b/configs/metadata.json": b"{}", "C:/evil": b"x"}, None, "not a relative path"),
        ({"b/configs/metadata.json": b"{}", "b\\..\\evil": b"x"}, None, "not a relative path"),
        ({"b/configs/metadata.json": b"{}"}, "b/models/model.pt", "symbolic link"),
    ],
)
def test_unsafe_entries_refused_before_anything_is_written(
    tmp_path: Path, entries: dict[str, bytes], link: str | None, words: str
) -> None:
    archive = _zip(tmp_path / "bad.zip", entries, link)
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(BundleError, match=words):
        extract_zip(archive, dest)
    assert list(dest.rglob("*")) == []
    assert not (tmp_path / "evil").exists()


def test_size_and_entry_limits_count_real_bytes(tmp_path: Path) -> None:
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as out:
        out.writestr("b/zeros.bin", b"\0" * (3 * 1024 * 1024))  # compresses to a few KiB
    with pytest.raises(BundleError, match="more than"):
        extract_zip(archive, tmp_path / "a", max_bytes=1024 * 1024)
    many = _zip(tmp_path / "many.zip", {f"b/{i}.txt": b"x" for i in range(20)})
    with pytest.raises(BundleError, match="at most 10"):
        extract_zip(many, tmp_path / "b", max_entries=10)
    with pytest.raises(BundleError, match="not a zip"):
        extract_zip(_write(tmp_path / "x.zip", b"PK\3\4 not really"), tmp_path / "c")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_model_zoo_zip_opens_at_its_top_folder(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path / "src" / "spleen_like", train=False)
    root = open_bundle(zip_folder(folder, tmp_path / "spleen_like.zip"), tmp_path / "unpacked")
    assert root.name == "spleen_like" and (root / "configs" / "metadata.json").is_file()
    assert bundle_name(tmp_path / "spleen_like.zip") == "spleen_like"
    with pytest.raises(BundleError, match="may contain only"):
        bundle_name(tmp_path / "bad name.zip")


def test_metadata_problems_name_the_key(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path / "b", train=False)
    meta_path = folder / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    bundle = load_bundle(folder)
    assert bundle.labels == {"organ_a": 1, "organ_b": 2} and bundle.channels == 3 and not bundle.trainable

    del meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="channel_def"):
        load_bundle(folder)

    meta = json.loads(meta_path.read_text())
    meta["network_data_format"]["outputs"]["pred"]["channel_def"] = {"0": "background", "1": "a"}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="num_channels 3 but channel_def names 2"):
        load_bundle(folder)

    (folder / "models" / "model.pt").unlink()
    with pytest.raises(BundleError, match=r"models/model\.pt"):
        load_bundle(folder)


def test_infer_type_by_name_as_monai_label_decides_it(tmp_path: Path) -> None:
    deepedit = load_bundle(make_bundle(tmp_path / "spleen_deepedit", train=False))
    assert deepedit.type.value == "deepedit"
    assert deepedit.labels == {"background": 0, "organ_a": 1, "organ_b": 2}  # MONAI Label keeps background for deepedit
    assert load_bundle(make_bundle(tmp_path / "lung_deepgrow", train=False)).type.value == "deepgrow"
    with pytest.raises(BundleError, match=r"vista3d.*point_labels"):
        load_bundle(make_bundle(tmp_path / "brats_vista", train=False))
    with pytest.raises(BundleError, match=r"'detector'"):
        load_bundle(make_bundle(tmp_path / "lung_nodule_detection", train=False))
    # metadata.json's labelgrid_type wins over the name
    folder = make_bundle(tmp_path / "not_vista", train=False)
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    meta["labelgrid_type"] = "segmentation"
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    assert load_bundle(folder).type.value == "segmentation"
