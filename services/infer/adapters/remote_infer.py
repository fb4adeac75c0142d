"""Batch images sent to every inference replica: InferenceService.Infer over one gRPC channel
with round-robin load balancing (e.g. `dns:///labelgrid-inference-headless:50052`, whose DNS
answers every replica), so a batch uses the devices of all replicas, not only its own."""

from __future__ import annotations

import grpc
from labelgrid.inference.v1 import inference_service_pb2 as pb
from labelgrid.inference.v1 import inference_service_pb2_grpc as pb_grpc
from labelgrid.inference.v1 import resources_pb2 as res

from services.common.errors import ErrorKind, LabelgridError
from services.common.grpc_errors import error_details
from services.common.protos import dict_to_struct, struct_to_dict
from services.common.resource_names import resource_type
from services.infer.domain.batch import ImageOutcome
from services.infer.domain.model import InferParams

MODEL = resource_type("labelgrid.inference/Model")
IMAGE = resource_type("labelgrid.datastore/Image")


class RemoteInfer:
    """`BatchInference`'s infer_one over gRPC: where one image ran, its saved label and result params."""

    def __init__(self, address: str, token: str = "", timeout: float = 600.0) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=[("grpc.lb_policy_name", "round_robin")])
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    async def __call__(self, model: str, image_id: str, params: InferParams) -> ImageOutcome:
        result = params.result
        request = pb.InferRequest(
            model=MODEL.format(model),
            image=IMAGE.format(image_id),
            params=res.InferParams(
                result=res.ResultOptions(
                    result_extension=result.extension,
                    result_dtype=result.dtype,
                    result_compress=result.compress,
                    save_label=True,
                    label_tag=result.label_tag,
                    params_only=True,
                ),
                device=params.device,
                params=dict_to_struct(params.extra),
            ),
        )
        try:
            async for message in self.stub.Infer(request, timeout=self.timeout, metadata=self.metadata):
                if message.WhichOneof("payload") == "header":
                    header = message.header
                    result_params = struct_to_dict(header.result_params)
                    return ImageOutcome(str(result_params.get("device", "")), header.saved_label, result_params)
        except grpc.aio.AioRpcError as rpc_error:
            details = error_details(rpc_error)
            error = LabelgridError(details.message or details.code.name, reason=details.reason or "INFERENCE_ERROR")
            error.kind = (
                ErrorKind[details.code.name] if details.code.name in ErrorKind.__members__ else ErrorKind.INTERNAL
            )
            raise error from None
        raise LabelgridError(f"the inference of {image_id} answered nothing", reason="INFERENCE_ERROR")

    async def close(self) -> None:
        await self.channel.close()
