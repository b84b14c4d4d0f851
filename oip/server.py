"""KServe's ``ModelServer`` with what the front server adds: a host to bind (KServe's binds every
interface), the ``/v2/models/{m}/explain`` route (KServe's REST v2 has none), OIP error bodies
(``{"error": "..."}``) with the status of the failure, and server readiness from TorchServe."""

from __future__ import annotations

import asyncio
from importlib import metadata
from typing import Optional, Union

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from grpc import aio
import orjson
from pydantic import ValidationError
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput
from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING, INFERENCE_CONTENT_LENGTH_HEADER, PredictorProtocol
from kserve.errors import ModelNotReady
from kserve.model import InferenceVerb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.rest.server import RESTServer
from kserve.protocol.rest.v2_datamodels import InferenceRequest, InferenceResponse
from concurrent import futures

from .errors import ClientError, UpstreamError
from .model import TorchServeModel

SERVER_NAME = "torchserve-xai"
EXTENSIONS = ["binary_tensor_data", "explanations_as_tensors"]
# gRPC messages: an explanation of a large image as FP16 plus the image itself.
GRPC_MESSAGE_BYTES = 64 * 1024 * 1024


def _kserve_app():
    from kserve.model_server import app  # KServe's FastAPI application (one per process)

    return app


class FrontServer(ModelServer):
    """REST (uvicorn) and gRPC on ``host``, serving :class:`TorchServeModel` instances."""

    def __init__(self, host: str, http_port: int, grpc_port: int, *, grace_period: int = 30):
        super().__init__(http_port=http_port, grpc_port=grpc_port, workers=1, enable_grpc=True,
                         enable_latency_logging=False, grace_period=grace_period)
        self.host = host
        self.dataplane.ready = self._ready  # readiness is TorchServe's (this instance only)
        self.dataplane.metadata = self._metadata
        self._kserve_decode = self.dataplane.decode
        self.dataplane.decode = self._decode

    def _decode(self, body, headers, protocol_version=PredictorProtocol.REST_V1.value, model_name=None):
        """A JSON body that FastAPI left as bytes (clients such as tritonclient send no
        Content-Type) is parsed as JSON, not refused for its missing binary-extension header."""
        if isinstance(body, (bytes, bytearray)) and protocol_version == PredictorProtocol.REST_V2.value:
            json_length = (headers or {}).get(INFERENCE_CONTENT_LENGTH_HEADER)
            if json_length is not None:
                return binary_request(bytes(body), json_length, model_name), {}
            try:
                body = InferenceRequest.model_validate_json(body)
            except ValidationError as error:
                raise ClientError(f"malformed inference request: {_problems(error.errors())}") from None
        return self._kserve_decode(body, headers, protocol_version=protocol_version, model_name=model_name)

    async def _ready(self) -> bool:
        models = list(self.registered_models.get_models().values())
        return bool(models) and all(await asyncio.gather(*(model.healthy() for model in models)))

    def _metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": metadata.version("torchserve-xai"), "extensions": EXTENSIONS}

    def start(self, models: list[TorchServeModel]) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        app = _kserve_app()
        self._add_routes(app)
        self._rest_server = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                                       self.http_port, grace_period=self.grace_period, timeout_keep_alive=65)
        self._rest_server.config.host = self.host
        self.servers.append(self._rest_server.start())
        self.servers.append(self._serve_grpc())
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())

    async def _serve_grpc(self) -> None:
        server = aio.server(futures.ThreadPoolExecutor(max_workers=4),
                            interceptors=(ExceptionToStatusInterceptor(),),
                            options=[("grpc.max_send_message_length", GRPC_MESSAGE_BYTES),
                                     ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES)])
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.dataplane, self.model_repository_extension), server)
        server.add_insecure_port(f"{self.host}:{self.grpc_port}")
        self._grpc_handle = server
        await server.start()
        await server.wait_for_termination()

    def stop(self, sig: int) -> None:
        async def shutdown():
            for model in self.registered_models.get_models().values():
                await model.upstream.close()
            if getattr(self, "_grpc_handle", None) is not None:
                await self._grpc_handle.stop(grace=5)
            if self._rest_server is not None:
                self._rest_server._server.should_exit = True

        asyncio.get_event_loop().create_task(shutdown())

    # -- REST additions ---------------------------------------------------------------------

    def _add_routes(self, app) -> None:
        """Before KServe adds its own: the first matching route wins."""
        dataplane = self.dataplane

        async def explain(raw_request: Request, raw_response: Response, model_name: str,
                          request_body: Union[InferenceRequest, bytes],
                          model_version: Optional[str] = None) -> Union[InferenceResponse, Response]:
            if not await dataplane.model_ready(model_name, True):
                raise ModelNotReady(model_name)
            headers = dict(raw_request.headers)
            request, _ = dataplane.decode(request_body, headers, protocol_version=PredictorProtocol.REST_V2.value,
                                          model_name=model_name)
            model = await dataplane.get_model(model_name)
            response, _ = await model(request, headers=headers, verb=InferenceVerb.EXPLAIN)
            body, response_headers = dataplane.encode(model_name=model_name, response=response, headers=headers,
                                                      req_attributes={})
            response_headers.pop("content-length", None)
            response_headers.pop("content-type", None)
            raw_response.headers.update(response_headers)
            if isinstance(body, bytes):
                raw_response.status_code = 200
                raw_response.body = body
                return raw_response
            return InferenceResponse.model_validate(body)

        app.add_api_route("/v2/models/{model_name}/explain", explain, methods=["POST"], response_model=None)
        app.add_api_route("/v2/models/{model_name}/versions/{model_version}/explain", explain, methods=["POST"],
                          response_model=None, include_in_schema=False)
        app.add_exception_handler(ClientError, _client_error)
        app.add_exception_handler(UpstreamError, _upstream_error)
        app.add_exception_handler(RequestValidationError, _validation_error)


async def _client_error(_request, error: ClientError):
    return ORJSONResponse(status_code=error.status, content={"error": error.reason})


async def _upstream_error(_request, error: UpstreamError):
    return ORJSONResponse(status_code=error.status, content={"error": error.reason})


def binary_request(body: bytes, json_length: str, model_name: str) -> InferRequest:
    """A request in the binary tensor extension: JSON header, then each binary input's bytes.

    KServe's own reader turns binary BYTES elements into UTF-8 text, which refuses an image file;
    here they stay bytes (``InferInput._raw_data``, which ``as_numpy`` deserialises).
    """
    if not json_length.isdigit() or int(json_length) > len(body):
        raise ClientError(f"{INFERENCE_CONTENT_LENGTH_HEADER}={json_length!r} does not fit a body of {len(body)} bytes")
    end = int(json_length)
    try:
        document = orjson.loads(body[:end])
    except orjson.JSONDecodeError as error:
        raise ClientError(f"malformed JSON header of a binary request: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise ClientError('a request needs "inputs": [...]')
    inputs, start = [], end
    for index, tensor in enumerate(document["inputs"]):
        if not isinstance(tensor, dict) or not {"name", "shape", "datatype"} <= tensor.keys():
            raise ClientError(f"input {index} needs name, shape and datatype")
        parameters = tensor.get("parameters") or {}
        infer_input = InferInput(tensor["name"], tensor["shape"], tensor["datatype"], parameters=parameters or None)
        if "data" in tensor:
            infer_input.data = tensor["data"]
        elif isinstance(parameters.get("binary_data_size"), int) and start + parameters["binary_data_size"] <= len(body):
            infer_input._raw_data = body[start:start + parameters["binary_data_size"]]
            start += parameters["binary_data_size"]
        else:
            raise ClientError(f"input {tensor['name']!r} has neither data nor a binary_data_size within the body")
        inputs.append(infer_input)
    outputs = [RequestedOutput(output["name"], output.get("parameters")) for output in document.get("outputs") or []]
    return InferRequest(model_name, inputs, request_id=document.get("id"), parameters=document.get("parameters"),
                        request_outputs=outputs or None)


def _problems(errors) -> str:
    return "; ".join(f"{'.'.join(str(part) for part in item.get('loc', ()))}: {item.get('msg')}" for item in errors[:5])


async def _validation_error(_request, error: RequestValidationError):
    return ORJSONResponse(status_code=400, content={"error": f"malformed request: {_problems(error.errors())}"})
