"""A KServe ``Model`` that forwards to one TorchServe model over its inference API.

Every image of a request becomes one TorchServe request, sent concurrently: TorchServe batches
them (and other clients' requests) as the model's batchSize says. The v2 protocol (REST and gRPC)
gets tensors (oip.tensors); the v1 protocol (``/v1/models/{m}:predict|:explain``) gets TorchServe's
JSON bodies, one per instance, as the TorchServe KServe envelope returned them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Mapping

import numpy as np
from kserve import Model
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse, RequestedOutput

from .errors import ClientError
from .tensors import (EXPLANATION_PREFIX, IMAGE_INPUT, Forward, Tensor, forward_for, reply_tensors)
from .upstream import TorchServeUpstream


class TorchServeModel(Model):
    def __init__(self, name: str, upstream: TorchServeUpstream, torchserve_model: str | None = None):
        super().__init__(name)
        self.upstream = upstream
        self.torchserve_model = torchserve_model or name
        self.ready = True  # it can forward; whether TorchServe can answer is healthy()'s question
        self._explainers: list[str] | None = None  # allowed by the model, once TorchServe described it

    async def healthy(self) -> bool:
        return await self.upstream.ready()

    def get_input_types(self) -> list[dict]:
        # One image file (PNG, JPEG, ...) per element: raw bytes, or base64 text in JSON.
        return [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]}]

    async def get_output_types(self) -> list[dict]:
        """The predictions, and one ``explanation.<method>`` per explainer this model allows (from
        TorchServe's description of it; ``explanation.{method}`` when that is unavailable). Each is
        returned when asked for (parameter "explain", or the explain route): FP16 [1, H, W] by
        default, FP32 [1, H, W] or BYTES [1] (PNG) with parameter "encoding"."""
        if self._explainers is None:
            self._explainers = await self.upstream.allowed_explainers(self.torchserve_model)
        methods = self._explainers or ["{method}"]
        return [
            {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
            {"name": "indices", "datatype": "INT64", "shape": [-1, -1]},
            *({"name": EXPLANATION_PREFIX + method, "datatype": "FP16", "shape": [1, -1, -1]} for method in methods),
        ]

    # -- the verbs --------------------------------------------------------------------------

    async def predict(self, payload, headers=None, response_headers=None):
        return await self._serve(payload, explain_route=False)

    async def explain(self, payload, headers=None):
        return await self._serve(payload, explain_route=True)

    async def _serve(self, payload, explain_route: bool):
        if isinstance(payload, InferRequest):
            return await self._infer(payload, explain_route)
        if isinstance(payload, Mapping):
            return await self._v1(payload, explain_route)
        raise ClientError(f"unsupported request body {type(payload).__name__}")

    async def _forward_one(self, forward: Forward, image: bytes) -> dict:
        route = "explanations" if forward.explain_route else "predictions"
        path = f"/{route}/{self.torchserve_model}"
        document = forward.document(image)
        if document is None:  # the raw image: no base64, no JSON on either side
            return await self.upstream.post(path, image, "application/octet-stream")
        return await self.upstream.post(path, json.dumps(document).encode(), "application/json")

    async def _infer(self, request: InferRequest, explain_route: bool) -> InferResponse:
        forward = forward_for(request.inputs, request.parameters, explain_route)
        replies = await asyncio.gather(*(self._forward_one(forward, image) for image in forward.images))
        tensors, parameters = reply_tensors(replies, forward)
        return self._response(request, tensors, parameters)

    def _response(self, request: InferRequest, tensors: list[Tensor], parameters: dict) -> InferResponse:
        """Outputs in the request's transport: over REST JSON a PNG travels as base64 text and an
        FP16 map in the binary extension (the JSON form of the protocol has no FP16)."""
        by_name = {tensor.name: tensor for tensor in tensors}
        requested = request.request_outputs or []
        unknown = [output.name for output in requested if output.name not in by_name]
        if unknown:
            raise ClientError(f"unknown output(s) {unknown}; this response has {list(by_name)}")
        default_binary = bool(request.use_binary_outputs)
        chosen = [(by_name[output.name], output.binary_data) for output in requested] if requested else \
            [(tensor, None) for tensor in tensors]
        outputs, flags = [], []
        for tensor, asked in chosen:
            binary = request.from_grpc or tensor.datatype == "FP16" or (default_binary if asked is None else bool(asked))
            data = tensor.data
            if tensor.datatype == "BYTES" and tensor.name.startswith(EXPLANATION_PREFIX) and not binary:
                data = np.array([base64.b64encode(item).decode("ascii") for item in data.reshape(-1)],
                                dtype=np.object_).reshape(data.shape)
            output = InferOutput(tensor.name, list(data.shape), tensor.datatype, data=data,
                                 parameters=dict(tensor.parameters) or None)
            if request.from_grpc:  # raw_output_contents for every output (KServe's to_grpc cannot mix)
                output.set_data_from_numpy(data, binary_data=True)
                output.parameters.pop("binary_data_size", None)
            outputs.append(output)
            flags.append(RequestedOutput(tensor.name, {"binary_data": binary}))
        return InferResponse(request.id or str(uuid.uuid4()), self.name, outputs, parameters=parameters or None,
                             use_binary_outputs=default_binary, requested_outputs=None if request.from_grpc else flags)

    async def _v1(self, payload: Mapping, explain_route: bool) -> dict:
        """v1: {"instances": [base64 | {"data"|"b64"|"image": base64, ...our JSON fields}]}."""
        instances = payload.get("instances")
        if not isinstance(instances, list) or not instances:
            raise ClientError('a v1 request is {"instances": [...]} with at least one instance')
        documents = [_v1_document(instance, index) for index, instance in enumerate(instances)]
        route = "explanations" if explain_route else "predictions"
        path = f"/{route}/{self.torchserve_model}"
        replies = await asyncio.gather(*(self.upstream.post(path, json.dumps(document).encode(), "application/json")
                                         for document in documents))
        return {"explanations" if explain_route else "predictions": list(replies)}


def _v1_document(instance: object, index: int) -> dict:
    if isinstance(instance, str):
        return {"image": instance}
    if isinstance(instance, Mapping):
        if "image" in instance:
            return dict(instance)
        for key in ("data", "b64"):
            if isinstance(instance.get(key), str):
                return {"image": instance[key], **{k: v for k, v in instance.items() if k != key}}
    raise ClientError(f'instance {index}: a base64 string or an object with "data", "b64" or "image"')
