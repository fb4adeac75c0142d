"""POST /infer/{model} end to end: the official client and httpx through the gateway to a real
gRPC inference endpoint.

The inference service belongs to another engineer and does not exist yet, so this module
serves a minimal *echo* InferenceService over real gRPC (its "label" is the input image,
read from the real datastore or from the upload). It checks the gateway's translation and
MONAI Label's answer shapes, not inference itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc
from labelgrid.inference.v1 import inference_service_pb2 as pb
from labelgrid.inference.v1 import inference_service_pb2_grpc as pb_grpc
from labelgrid.inference.v1 import resources_pb2 as res
from monailabel.client import MONAILabelClient

from tests.contract.helpers import nifti_bytes
from tests.integration.conftest import GatewayStack

pytestmark = pytest.mark.timeout(120)

NIFTI = nifti_bytes(seed=21)
CHUNK = 1024 * 1024


class EchoInference(pb_grpc.InferenceServiceServicer):
    """Answers like an inference service whose one model returns its input image as the label."""

    def __init__(self, datastore: ds_grpc.DatastoreServiceStub) -> None:
        self.datastore = datastore

    async def GetAppInfo(self, request: Any, context: Any) -> pb.GetAppInfoResponse:
        return pb.GetAppInfoResponse(
            display_name="Echo App",
            description="echoes",
            version="9.9",
            labels={"spleen": 1},
        )

    async def ListModels(self, request: Any, context: Any) -> pb.ListModelsResponse:
        config = [
            common_pb2.ConfigEntry(
                key="device",
                value=common_pb2.ConfigValue(
                    choice_value=common_pb2.ConfigChoice(options=["cpu", "cuda"])
                ),
            ),
            common_pb2.ConfigEntry(
                key="roi", value=common_pb2.ConfigValue(int_value=96)
            ),
        ]
        model = res.Model(
            name="models/echo",
            model_id="echo",
            type=res.INFER_TYPE_DEEPGROW,
            labels={"spleen": 1},
            labels_as_list=True,
            dimension=3,
            description="echo model",
            config=config,
        )
        return pb.ListModelsResponse(models=[model])

    async def _answer(
        self,
        model: str,
        params: res.InferParams,
        data: bytes,
        context: Any,
        response_type: Any,
    ) -> AsyncIterator[Any]:
        if model != "models/echo":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {model!r} not found")
        result = {
            "label_names": {"spleen": 1},
            "echo": json_format.MessageToDict(params.params),
            "foreground": len(params.prompt.foreground),
        }
        header = pb.InferResultHeader(label_names={"spleen": 1})
        header.result_params.update(result)
        if not params.result.params_only:
            ext = params.result.result_extension or ".nii.gz"
            header.label.CopyFrom(
                common_pb2.BlobInfo(
                    file_name=f"result{ext}",
                    size_bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
        yield response_type(header=header)
        if not params.result.params_only:
            for start in range(0, len(data), CHUNK):
                yield response_type(chunk=data[start : start + CHUNK])

    async def _read_image(self, name: str, context: Any) -> bytes:
        data = b""
        try:
            async for message in self.datastore.DownloadImage(
                ds_pb.DownloadImageRequest(name=name)
            ):
                if message.WhichOneof("payload") == "chunk":
                    data += message.chunk
        except grpc.aio.AioRpcError as err:
            await context.abort(err.code(), err.details())
        return data

    async def Infer(
        self, request: pb.InferRequest, context: Any
    ) -> AsyncIterator[pb.InferResponse]:
        data = await self._read_image(request.image, context)
        async for message in self._answer(
            request.model, request.params, data, context, pb.InferResponse
        ):
            yield message

    async def InferUpload(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[pb.InferUploadResponse]:
        header: pb.InferUploadHeader | None = None
        image, label = b"", b""
        async for message in request_iterator:
            kind = message.WhichOneof("payload")
            if kind == "header":
                header = message.header
            elif kind == "image_chunk":
                image += message.image_chunk
            elif kind == "image_finish":
                assert message.image_finish.sha256 == hashlib.sha256(image).hexdigest()
            elif kind == "label_chunk":
                label += message.label_chunk
        assert header is not None
        if header.image:
            image = await self._read_image(header.image, context)
        async for message in self._answer(
            header.model, header.params, image, context, pb.InferUploadResponse
        ):
            yield message


async def start_echo(datastore_address: str) -> tuple[str, grpc.aio.Server]:
    channel = grpc.aio.insecure_channel(datastore_address)
    server = grpc.aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(
        EchoInference(ds_grpc.DatastoreServiceStub(channel)), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return f"127.0.0.1:{port}", server


@pytest.fixture(scope="module")
def echo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    stack = GatewayStack(
        tmp_path_factory.mktemp("infer"), start_inference=start_echo
    ).start()
    yield stack.url
    stack.stop()


@pytest.fixture
def client(echo_url: str, tmp_path: Path) -> MONAILabelClient:
    c = MONAILabelClient(echo_url, tmpdir=str(tmp_path), client_id="tester")
    image = tmp_path / "in.nii.gz"
    image.write_bytes(NIFTI)
    c.upload_image(str(image), "img_echo")
    return c


def test_info_lists_models(client: MONAILabelClient) -> None:
    info = client.info()
    assert info["name"] == "Echo App" and info["version"] == "9.9"
    assert info["labels"] == {"spleen": 1}
    assert info["models"]["echo"] == {
        "type": "deepgrow",
        "labels": ["spleen"],
        "dimension": 3,
        "description": "echo model",
        "config": {"device": ["cpu", "cuda"], "roi": 96},
    }


def test_client_infer_multipart(client: MONAILabelClient) -> None:
    path, params = client.infer(
        "echo", "img_echo", {"result_extension": ".nrrd", "foreground": [[1, 2, 3]]}
    )
    assert path is not None and path.endswith("result.nrrd")
    assert Path(path).read_bytes() == NIFTI
    assert params["label_names"] == {"spleen": 1} and params["foreground"] == 1
    assert params["echo"]["client_id"] == "tester"


def test_client_infer_with_file_and_session(
    client: MONAILabelClient, tmp_path: Path
) -> None:
    local = tmp_path / "local.nii.gz"
    local.write_bytes(nifti_bytes(seed=22))
    path, _ = client.infer("echo", "", {}, file=str(local))
    assert Path(path).read_bytes() == local.read_bytes()
    session_id = client.create_session(str(local))["session_id"]
    path, _ = client.infer("echo", "", {}, session_id=session_id)
    assert Path(path).read_bytes() == local.read_bytes()


def test_output_image_and_json(echo_url: str, client: MONAILabelClient) -> None:
    with httpx.Client(base_url=echo_url) as http:
        raw = http.post(
            "/infer/echo",
            params={"image": "img_echo", "output": "image"},
            data={"params": '{"result_extension": ".nrrd"}'},
        )
        assert raw.status_code == 200 and raw.content == NIFTI
        assert (
            raw.headers["content-disposition"] == 'attachment; filename="result.nrrd"'
        )
        as_json = http.post(
            "/infer/echo", params={"image": "img_echo", "output": "json"}
        )
        assert as_json.headers["content-type"] == "application/json"
        assert as_json.json()["label_names"] == {"spleen": 1}
        multipart = http.post("/infer/echo", params={"image": "img_echo"})
        assert multipart.headers["content-type"].startswith(
            "multipart/form-data; boundary="
        )
        assert int(multipart.headers["content-length"]) == len(multipart.content)
        assert http.post("/infer/nope", params={"image": "img_echo"}).status_code == 404
        assert http.post("/infer/echo", params={"image": "missing"}).status_code == 404
