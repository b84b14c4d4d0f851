"""KServe's Python SDK (InferenceRESTClient) against an OIP server, in a process of its own.

Why a process: the kserve package and tritonclient.grpc each register the protocol's protobuf
messages ("inference.ServerLiveRequest", ...) under the same names in protobuf's default pool, so
one Python process cannot import both. The test runs this module and checks what it prints.

    python -m support.kserve_sdk_scenario < {"url": "http://127.0.0.1:PORT", "images": {name: base64}}

prints one JSON object: each call's result (tensors as name -> {datatype, shape, data, parameters})
or its HTTP error (status and body).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys

import httpx
import numpy as np
from kserve import InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput, InferRequest


def tensors(response) -> dict:
    found = {}
    for output in response.outputs:
        data = output.as_numpy()
        if data.dtype == np.object_:
            values = [base64.b64encode(v).decode() if isinstance(v, bytes) else v for v in data.reshape(-1)]
        else:
            values = data.reshape(-1).tolist()
        found[output.name] = {"datatype": output.datatype, "shape": list(data.shape), "data": values,
                              "parameters": {k: v for k, v in dict(output.parameters or {}).items()
                                             if k != "binary_data_size"}}
    return found


def request(image: bytes, parameters: dict | None, *, binary: bool) -> InferRequest:
    tensor = InferInput("image", [1], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
    else:
        tensor.data = [base64.b64encode(image).decode()]
    return InferRequest("shapes", [tensor], parameters=parameters)


async def scenario(url: str, images: dict[str, bytes]) -> dict:
    results: dict = {}
    v2 = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
    v1 = InferenceRESTClient(RESTConfig(protocol="v1", timeout=120))

    async def attempt(name, call):
        try:
            results[name] = await call
        except httpx.HTTPStatusError as error:
            results[name] = {"status": error.response.status_code, "body": error.response.json()}

    try:
        results["live"] = await v2.is_server_live(url)
        results["ready"] = await v2.is_server_ready(url)
        results["model_ready"] = await v2.is_model_ready(url, "shapes")
        for binary in (False, True):
            response = await v2.infer(url, request(images["triangle"], None, binary=binary), model_name="shapes")
            results[f"predict_{'binary' if binary else 'json'}"] = tensors(response)
        response = await v2.infer(url, request(images["square"], {"explain": "grad_cam,saliency"}, binary=True),
                                  model_name="shapes")
        results["explain_binary"] = tensors(response)
        document = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                "data": [base64.b64encode(images["cross"]).decode()]}],
                    "parameters": {"encoding": "fp32"}}
        results["explain_route_json"] = await v2.infer(url + "/v2/models/shapes/explain", document,
                                                       is_graph_endpoint=True)
        instance = base64.b64encode(images["star"]).decode()
        results["v1_predict"] = await v1.infer(url, {"instances": [{"data": instance}, instance]}, model_name="shapes")
        results["v1_explain"] = await v1.explain(url, "shapes", {"instances": [{"data": instance}]})
        await attempt("corrupt", v2.infer(url, request(b"GIF89a but no more", None, binary=True), model_name="shapes"))
        await attempt("capped", v2.infer(url, request(images["square"], {
            "explain": "occlusion", "options": json.dumps({"occlusion": {"window": 2, "stride": 1}})}, binary=True),
            model_name="shapes"))
    finally:
        await v2.close()
        await v1.close()
    return results


def main() -> int:
    spec = json.load(sys.stdin)
    images = {name: base64.b64decode(value) for name, value in spec["images"].items()}
    print(json.dumps(asyncio.run(scenario(spec["url"], images))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
