"""KServe's ``ModelServer`` with what the front server adds: a host to bind (KServe's binds every
interface), the ``/v2/models/{m}/explain`` route (KServe's REST v2 has none), OIP error bodies
(``{"error": "..."}``) with the status of the failure, and server readiness from TorchServe."""

from __future__ import annotations

import asyncio
import logging
from importlib import metadata

from concurrent import futures

import orjson
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from grpc import aio
from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING, INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import ModelNotReady
from kserve.model import InferenceVerb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput
from kserve.protocol.rest.server import RESTServer
from starlette.routing import Route
from timing_asgi import TimingMiddleware

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

    def __init__(self, host: str, http_port: int, grpc_port: int, *, grace_period: int = 30, access_log: bool = False):
        super().__init__(http_port=http_port, grpc_port=grpc_port, workers=1, enable_grpc=True,
                         enable_latency_logging=False, grace_period=grace_period)
        self.host = host
        if not access_log:
            # No log line per request (uvicorn's access log, KServe's per-route timings): on a small
            # model they are a visible part of the front server's cost, and TorchServe logs every
            # request anyway (access_log.log) and Prometheus counts them.
            for name in ("uvicorn.access", "kserve.trace"):
                logging.getLogger(name).setLevel(logging.WARNING)
        self.dataplane.ready = self._ready  # readiness is TorchServe's (this instance only)
        self.dataplane.metadata = self._metadata
        self.dataplane.explain = self._v1_explain

    async def _v1_explain(self, model_name: str, request, headers=None):
        """The v1 explain route's call: KServe's own returns the request's headers as the response's
        (a client's Authorization or Transfer-Encoding would come back); this returns none."""
        model = await self.dataplane.get_model(model_name)
        response, _ = await model(request, headers=headers, verb=InferenceVerb.EXPLAIN)
        return response, {}

    async def _ready(self) -> bool:
        models = list(self.registered_models.get_models().values())
        return bool(models) and all(await asyncio.gather(*(model.healthy() for model in models)))

    def _metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": metadata.version("torchserve-xai"), "extensions": EXTENSIONS}

    def start(self, models: list[TorchServeModel]) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        app = _kserve_app()
        self._add_routes(app)
        self._rest_server = LeanRESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                                           self.http_port, grace_period=self.grace_period, timeout_keep_alive=65)
        self._rest_server.config.host = self.host
        self.servers.append(self._rest_server.start())
        self.servers.append(self._serve_grpc())
        self.register_signal_handler()
        # uvloop (a KServe dependency) where available: KServe's own start uses asyncio's loop.
        try:
            import uvloop
        except ImportError:
            uvloop = None
        if uvloop is not None:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # this process only: the front server's
        asyncio.run(self._serve_with_loop_setup())

    async def _serve_with_loop_setup(self) -> None:
        self.setup_event_loop()
        await self._serve()

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
        """Our v2 infer and explain routes, before KServe adds its own (the first match wins).

        They do what KServe's infer route does (readiness, decode, the model, encode) with the
        request read by :func:`parse_request` instead of pydantic (KServe's binary reader also
        turns BYTES elements into UTF-8 text, which refuses an image file) and the reply written
        with orjson instead of a pydantic model and FastAPI's encoder: together about a third of
        the front server's time per request (profiled against an instant upstream).
        """
        dataplane = self.dataplane

        def route(verb: InferenceVerb):
            async def endpoint(raw_request: Request) -> Response:
                model_name = raw_request.path_params["model_name"]
                if not await dataplane.model_ready(model_name, True):
                    raise ModelNotReady(model_name)
                headers = dict(raw_request.headers)
                body = await raw_request.body()
                request = parse_request(body, headers.get(INFERENCE_CONTENT_LENGTH_HEADER), model_name)
                model = await dataplane.get_model(model_name)
                response, _ = await model(request, headers=headers, verb=verb)
                encoded, response_headers = dataplane.encode(model_name=model_name, response=response,
                                                             headers=headers, req_attributes={})
                response_headers.pop("content-length", None)
                if isinstance(encoded, bytes):
                    response_headers["content-type"] = "application/octet-stream"
                    return Response(content=encoded, headers=response_headers)
                response_headers.pop("content-type", None)
                return ORJSONResponse(content=encoded, headers=response_headers)

            return endpoint

        # Plain Starlette routes (no FastAPI dependency resolution: the endpoint reads the request).
        for verb, name in ((InferenceVerb.PREDICT, "infer"), (InferenceVerb.EXPLAIN, "explain")):
            for path in (f"/v2/models/{{model_name}}/{name}", f"/v2/models/{{model_name}}/versions/{{model_version}}/{name}"):
                app.router.routes.append(Route(path, route(verb), methods=["POST"]))
        app.add_exception_handler(ClientError, _client_error)
        app.add_exception_handler(UpstreamError, _upstream_error)
        app.add_exception_handler(RequestValidationError, _validation_error)


class LeanRESTServer(RESTServer):
    """KServe's REST server without its timing middleware, which logs every request's timings at
        INFO (and measures resource usage twice per request) whether or not anyone reads them."""

    def create_application(self):
        super().create_application()
        app = _kserve_app()
        app.user_middleware = [entry for entry in app.user_middleware if entry.cls is not TimingMiddleware]


def parse_request(body: bytes, json_length: str | None, model_name: str) -> InferRequest:
    """A v2 request: JSON, or in the binary tensor extension (JSON header of ``json_length``
    bytes, then each binary input's bytes). BYTES elements stay bytes (``InferInput._raw_data``,
    which ``as_numpy`` deserialises)."""
    if json_length is None:
        end = len(body)
    elif not json_length.isdigit() or int(json_length) > len(body):
        raise ClientError(f"{INFERENCE_CONTENT_LENGTH_HEADER}={json_length!r} does not fit a body of {len(body)} bytes")
    else:
        end = int(json_length)
    try:
        document = orjson.loads(body[:end])
    except orjson.JSONDecodeError as error:
        raise ClientError(f"malformed JSON request: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise ClientError('malformed request: it needs "inputs": [...]')
    inputs, start = [], end
    for index, tensor in enumerate(document["inputs"]):
        if not isinstance(tensor, dict) or not {"name", "shape", "datatype"} <= tensor.keys() \
                or not isinstance(tensor["shape"], list) or not isinstance(tensor["datatype"], str):
            raise ClientError(f"malformed request: input {index} needs a name, a shape list and a datatype")
        parameters = tensor.get("parameters") or {}
        infer_input = InferInput(str(tensor["name"]), tensor["shape"], tensor["datatype"], parameters=parameters or None)
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if "data" in tensor:
            infer_input.data = tensor["data"]
        elif isinstance(size, int) and json_length is not None and start + size <= len(body):
            infer_input._raw_data = body[start:start + size]
            start += size
        else:
            raise ClientError(f"input {tensor['name']!r} has neither data nor a binary_data_size within the body")
        inputs.append(infer_input)
    outputs = document.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and "name" in o for o in outputs):
        raise ClientError('malformed request: "outputs" is a list of {"name": ...}')
    parameters = document.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ClientError('malformed request: "parameters" is an object')
    requested = [RequestedOutput(output["name"], output.get("parameters")) for output in outputs]
    return InferRequest(model_name, inputs, request_id=document.get("id"), parameters=parameters,
                        request_outputs=requested or None)


async def _client_error(_request, error: ClientError):
    return ORJSONResponse(status_code=error.status, content={"error": error.reason})


async def _upstream_error(_request, error: UpstreamError):
    return ORJSONResponse(status_code=error.status, content={"error": error.reason})


def _problems(errors) -> str:
    return "; ".join(f"{'.'.join(str(part) for part in item.get('loc', ()))}: {item.get('msg')}" for item in errors[:5])


async def _validation_error(_request, error: RequestValidationError):
    return ORJSONResponse(status_code=400, content={"error": f"malformed request: {_problems(error.errors())}"})
