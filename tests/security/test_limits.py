"""Ids, JSON and work-sizing params from hostile clients, over REST and gRPC: a precise 4xx /
INVALID_ARGUMENT, nothing stored, the services still answering."""

from __future__ import annotations

import json
from urllib.parse import quote

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.inference.v1 import inference_service_pb2 as inf_pb
from labelgrid.inference.v1 import resources_pb2 as inf_res

from services.common.errors import InvalidArgument
from services.common.protos import dict_to_struct
from services.datastore.domain import ids
from tests.fixtures.hostile import BASE_IMAGE, Hostile, nifti, read_all, upload_messages

pytestmark = pytest.mark.timeout(120)

BAD_IDS = ["abc\n", "abc\r\n", "a\x00b", "x" * 201, "../etc", ".hidden", "a/b", "a%2Fb", "é"]


# -- ids -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", BAD_IDS)
@pytest.mark.parametrize("route", ["get-image", "put-image", "put-label-tag", "infer-model"])
def test_rest_refuses_bad_ids(hostile: Hostile, route: str, value: str) -> None:
    http = hostile.http
    before = hostile.stored()
    if route == "get-image":
        answer = http.get("/datastore/image", params={"image": value})
    elif route == "put-image":
        answer = http.put("/datastore/image", params={"image": value}, files={"file": ("a.nii.gz", nifti())})
    elif route == "put-label-tag":
        answer = http.put(
            "/datastore/label", params={"image": BASE_IMAGE, "tag": value}, files={"label": ("l.nii.gz", nifti())}
        )
    else:
        answer = http.post(f"/infer/{quote(value, safe='')}", params={"image": BASE_IMAGE})
    assert answer.status_code in ((400, 404) if route == "infer-model" else (400,)), (answer.status_code, answer.text)
    assert hostile.stored() == before
    hostile.assert_alive()


@pytest.mark.parametrize("value", BAD_IDS)
def test_grpc_refuses_bad_ids(hostile: Hostile, value: str) -> None:
    data = nifti()
    before = hostile.stored()
    header = ds_pb.UploadImageHeader(image_id=value, file_name="a.nii.gz", size_bytes=len(data))
    with pytest.raises(grpc.RpcError) as caught:
        hostile.datastore.UploadImage(upload_messages("datastore", header, data), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as caught:
        hostile.datastore.GetImage(ds_pb.GetImageRequest(name=f"images/{value}"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert hostile.stored() == before
    hostile.assert_alive()


_TEXT = st.text(st.characters(codec="utf-8"), max_size=210)  # no lone surrogates


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=_TEXT)
def test_gateway_and_datastore_agree_on_ids(hostile: Hostile, value: str) -> None:
    """Generated ids: the gateway refuses (400) exactly what the datastore's rule refuses, and
    nothing is ever a 5xx."""
    answer = hostile.http.get("/datastore/image", params={"image": value})
    try:
        ids.check_image_id(value)
        valid = True
    except InvalidArgument:
        valid = False
    assert answer.status_code < 500
    assert (answer.status_code == 400) == (not valid), (value, answer.status_code, answer.text)


# -- JSON ------------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def _nested(depth: int) -> str:
    return "{" + '"a":{' * (depth - 1) + "}" * depth


@pytest.mark.parametrize(
    ("params", "status"),
    [('{"a":' + DEEP + "}", 422), (_nested(40), 422), (json.dumps({"a": [[[[1]]]]}), 200)],
    ids=["100k-deep", "40-deep", "4-deep-ok"],
)
@pytest.mark.parametrize("route", ["put-image", "image-info"])
def test_json_form_fields_are_bounded(hostile: Hostile, route: str, params: str, status: int) -> None:
    before = hostile.stored()
    if route == "put-image":
        answer = hostile.http.put(
            "/datastore/image",
            params={"image": "json-case"},
            files={"file": ("a.nii.gz", nifti())},
            data={"params": params},
        )
    else:
        answer = hostile.http.put("/datastore/image/info", params={"image": BASE_IMAGE}, data={"info": params})
    assert answer.status_code == status, answer.text[:300]
    if status != 200:
        assert hostile.stored() == before
    elif route == "put-image":
        assert hostile.http.delete("/datastore/image", params={"id": "json-case"}).status_code == 200
    hostile.assert_alive()


@pytest.mark.parametrize(
    ("body", "status"),
    [(DEEP, 422), (_nested(40), 422), (json.dumps({"a": "x" * (5 * 1024 * 1024)}), 413)],
    ids=["100k-deep", "40-deep", "5-MiB"],
)
def test_json_bodies_are_bounded(hostile: Hostile, body: str, status: int) -> None:
    """A 100k-deep body (too deep to parse) is a 422, anything that parses is bounded in depth
    and size before it becomes a gRPC message."""
    answer = hostile.http.post("/activelearning/random", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text[:300]
    hostile.assert_alive()


# -- params that size the work -----------------------------------------------------------------

BAD_WINDOWS = [
    {"roi_size": [1024, 1024, 1024]},
    {"roi_size": [0, 64, 64]},
    {"roi_size": [64, 64, 64, 64]},
    {"roi_size": "big"},
    {"sw_batch_size": 1_000_000},
    {"sw_batch_size": 0},
    {"sw_batch_size": 2.5},
    {"sw_overlap": 0.999},
]


@pytest.mark.parametrize("params", BAD_WINDOWS, ids=[json.dumps(p) for p in BAD_WINDOWS])
def test_infer_window_params_are_bounded_rest(hostile: Hostile, params: dict) -> None:
    answer = hostile.http.post(
        "/infer/segmentation", params={"image": BASE_IMAGE, "output": "json"}, data={"params": json.dumps(params)}
    )
    assert answer.status_code == 422, answer.text[:300]
    assert next(iter(params)) in answer.json()["detail"]
    hostile.assert_alive()


@pytest.mark.parametrize("params", BAD_WINDOWS[:2] + BAD_WINDOWS[4:5], ids=["roi-huge", "roi-zero", "batch-huge"])
def test_infer_window_params_are_bounded_grpc(hostile: Hostile, params: dict) -> None:
    data = nifti()
    header = inf_pb.InferUploadHeader(
        model="models/segmentation",
        image_file_name="a.nii.gz",
        image_size_bytes=len(data),
        params=inf_res.InferParams(params=dict_to_struct(params)),
    )
    with pytest.raises(grpc.RpcError) as caught:
        read_all(hostile.inference.InferUpload(upload_messages("inference", header, data), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert next(iter(params)) in (caught.value.details() or "")
    hostile.assert_alive()


@pytest.mark.parametrize("params", BAD_WINDOWS[:1] + BAD_WINDOWS[4:5], ids=["roi-huge", "batch-huge"])
def test_infer_window_params_with_an_uploaded_image(hostile: Hostile, params: dict) -> None:
    """The same refusal when the image is uploaded with the request (an InferUpload stream)."""
    answer = hostile.http.post(
        "/infer/segmentation", files={"file": ("a.nii.gz", nifti((64, 64, 64)))}, data={"params": json.dumps(params)}
    )
    assert answer.status_code == 422, answer.text[:300]
    assert next(iter(params)) in answer.json()["detail"]
    hostile.assert_alive()


def test_a_sane_window_still_works(hostile: Hostile) -> None:
    answer = hostile.http.post(
        "/infer/segmentation",
        params={"image": BASE_IMAGE, "output": "json"},
        data={"params": json.dumps({"roi_size": [32, 32, 32], "sw_batch_size": 2, "sw_overlap": 0.5})},
    )
    assert answer.status_code == 200, answer.text[:300]


@pytest.mark.parametrize("name", ["..", ".", "x.txt", "a.zip", "noext"])
def test_infer_upload_names_are_checked_before_bytes(hostile: Hostile, name: str) -> None:
    header = inf_pb.InferUploadHeader(model="models/segmentation", image_file_name=name, image_size_bytes=10)
    with pytest.raises(grpc.RpcError) as caught:
        read_all(hostile.inference.InferUpload(iter([inf_pb.InferUploadRequest(header=header)]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    hostile.assert_alive()


def test_page_size_is_bounded(hostile: Hostile) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        hostile.datastore.ListImages(ds_pb.ListImagesRequest(page_size=-1), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(hostile.datastore.ListImages(ds_pb.ListImagesRequest(page_size=2**31 - 1), timeout=10).images) <= 1000
