"""The Open Inference Protocol front server (package oip) with real clients: tritonclient over HTTP
(JSON and the binary tensor extension) and gRPC, KServe's own REST client, and plain HTTP for
the exact status and body.

Two deployments, each driven by every client:
- "stack": `make serve-kserve`'s module (python -m tools.serve_kserve) as a subprocess on free
  loopback ports: TorchServe with token auth on, the front server reading its key;
- "pod": the ServingRuntime's container of deploy/kserve, emulated (support/pod_emulation.py): the
  front server starts TorchServe itself from the generated config.

Every answer is checked against TorchServe's own answer for the same image: scores equal the
/predictions scores, each FP16 map equals the npy-f16 map TorchServe returns directly, reduced
with serving's own reduce_channels.

KServe's SDK runs in a subprocess (support/kserve_sdk_scenario.py): it and tritonclient.grpc
register the same protobuf names, so one process cannot import both.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from PIL import Image

if importlib.util.find_spec("kserve") is None:  # not imported here: see the module doc
    pytest.skip("the kserve extra is needed (pip install -e '.[test]')", allow_module_level=True)
tritonhttp = pytest.importorskip("tritonclient.http", reason="tritonclient[http,grpc] is in the test extra")
tritongrpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is in the test extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

from serving.rendering.encode import reduce_channels  # noqa: E402
from support import manifests as m  # noqa: E402
from support.pod_emulation import EmulatedPod  # noqa: E402
from tools.demo_server import LOCAL_CONFIG, b64, build_store, shape_png  # noqa: E402
from tools.http_client import HttpReply, http_request  # noqa: E402
from tools.ports import free_ports  # noqa: E402

MODEL_CONFIG = m.REPO_ROOT / "model_store" / "shapes" / "model-config.yaml"
JSON = {"Content-Type": "application/json"}
CLASSES = ["circle", "square", "triangle", "cross", "star"]
FRONTS = ["stack", "pod"]


@dataclass
class Front:
    name: str
    url: str  # OIP REST
    grpc: str  # OIP gRPC host:port
    torchserve_url: str
    management_url: str
    key_file: Path | None = None

    @property
    def host_port(self) -> str:
        return self.url.removeprefix("http://")

    def key(self, api: str) -> dict:
        if self.key_file is None:
            return {}
        return {"Authorization": f"Bearer {json.loads(self.key_file.read_text())[api]['key']}"}

    def describe(self) -> dict:
        """TorchServe's own description of the model, with the handler's custom metadata."""
        reply = http_request(f"{self.management_url}/models/shapes?customized=true", headers=self.key("management"))
        assert reply.status == 200, reply.text
        return reply.json()[0]

    def torchserve(self, route: str, document: dict) -> HttpReply:
        """TorchServe directly (the reference), with its inference key when auth is on."""
        headers = {**JSON, **self.key("inference")}
        return http_request(f"{self.torchserve_url}/{route}/shapes", "POST", json.dumps(document).encode(), headers,
                            timeout=120)


class StackProcess:
    """`python -m tools.serve_kserve` (what `make serve-kserve` runs) on free ports."""

    def __init__(self, store: Path, run_root: Path):
        inference, management, metrics, http, grpc = free_ports(5)
        self.environment = {**os.environ, "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{inference}",
                            "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{management}",
                            "TS_METRICS_ADDRESS": f"http://127.0.0.1:{metrics}",
                            "OIP_HTTP_PORT": str(http), "OIP_GRPC_PORT": str(grpc)}
        self.command = [sys.executable, "-m", "tools.serve_kserve", "--model-store", str(store), "--models",
                        "shapes=shapes.mar", "--config", str(LOCAL_CONFIG), "--run-root", str(run_root),
                        "--example-image", "docs/examples/circle.png"]
        self.front = Front("stack", f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"http://127.0.0.1:{inference}",
                           f"http://127.0.0.1:{management}", run_root / str(inference) / "key_file.json")
        self.log_path = run_root / "serve_kserve.log"
        self.process: subprocess.Popen | None = None
        self.pids: set[int] = set()

    def start(self) -> None:
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.command, cwd=m.REPO_ROOT, env=self.environment, stdout=self.log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 240
        while "Ctrl-C stops both" not in self.output():
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.5)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tree(self) -> set[int]:
        try:
            root = psutil.Process(self.process.pid)
            return {root.pid} | {child.pid for child in root.children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C as a terminal sends it: SIGINT to the foreground process group."""
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            for sig, wait in ((signal.SIGINT, 60), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.process.pid, sig)
                    self.process.wait(timeout=wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        for pid in self.pids:  # anything left of the tree (a failed stop) goes too
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


@pytest.fixture(scope="module")
def deployments(tmp_path_factory):
    store = build_store(tmp_path_factory.mktemp("store"))
    stack = StackProcess(store, tmp_path_factory.mktemp("stack"))
    (container,) = m.find(m.render(m.KSERVE), "ServingRuntime")["spec"]["containers"]
    pod = EmulatedPod(container, target="kserve", model_config=yaml.safe_load(MODEL_CONFIG.read_text()),
                      model_name="shapes", archives=[store / "shapes.mar"], run_dir=tmp_path_factory.mktemp("pod"))
    try:
        with ThreadPoolExecutor(2) as pool:  # both spend their start in the JVM and the model load
            for future in [pool.submit(stack.start), pool.submit(pod.start)]:
                future.result()
        stack.pids = stack.tree()
        yield {"stack": stack, "pod": pod}
    finally:
        pod.stop()
        stack.stop()


@pytest.fixture(params=FRONTS)
def front(request, deployments) -> Front:
    if request.param == "stack":
        stack = deployments["stack"]
        if stack.process.poll() is not None:
            pytest.fail("the stack was stopped by an earlier test")
        return stack.front
    pod = deployments["pod"]
    return Front("pod", pod.url, pod.grpc_address, pod.inference_url, pod.management_url)


# -- clients ----------------------------------------------------------------------------------


def triton_http_infer(front: Front, image: bytes, parameters: dict | None = None, *, binary: bool,
                      name: str = "image", outputs: list[str] | None = None):
    """tritonclient over HTTP: binary=True sends the image in the binary extension and asks for
    binary outputs; False sends base64 text in JSON and asks for JSON outputs (an FP16 map still
    comes binary: JSON has no FP16)."""
    client = tritonhttp.InferenceServerClient(front.host_port, network_timeout=120, connection_timeout=120)
    tensor = tritonhttp.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image if binary else b64(image).encode()], dtype=np.object_), binary_data=binary)
    requested = [tritonhttp.InferRequestedOutput(output, binary_data=binary) for output in outputs or []]
    return client.infer("shapes", [tensor], outputs=requested or None, parameters=parameters)


def triton_grpc_infer(front: Front, image: bytes, parameters: dict | None = None, name: str = "image"):
    client = tritongrpc.InferenceServerClient(front.grpc)
    tensor = tritongrpc.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    return client.infer("shapes", [tensor], parameters=parameters, client_timeout=120)


def kserve_sdk(front: Front) -> dict:
    """The KServe SDK scenario's results against this front server (one subprocess)."""
    images = {shape: b64(shape_png(shape)) for shape in ("triangle", "square", "cross", "star")}
    done = subprocess.run([sys.executable, "-m", "support.kserve_sdk_scenario"], input=json.dumps(
        {"url": front.url, "images": images}), capture_output=True, text=True, timeout=300, cwd=m.REPO_ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(m.REPO_ROOT / "tests"), str(m.REPO_ROOT)])})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def sdk_array(tensor: dict) -> np.ndarray:
    dtype = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "BYTES": np.object_}[tensor["datatype"]]
    return np.array(tensor["data"], dtype=dtype).reshape(tensor["shape"])


def as_outputs(result, client: str) -> dict:
    """{name: (numpy array, parameters dict)} from any client's result."""
    if client == "grpc":
        response = result.get_response()
        return {output.name: (result.as_numpy(output.name),
                              {key: getattr(value, value.WhichOneof("parameter_choice"))
                               for key, value in output.parameters.items()})
                for output in response.outputs}
    return {output["name"]: (result.as_numpy(output["name"]), output.get("parameters", {}))
            for output in result.get_response()["outputs"]}


def infer_with(client: str, front: Front, image: bytes, parameters: dict | None = None):
    if client == "triton-http-json":
        return as_outputs(triton_http_infer(front, image, parameters, binary=False), client)
    if client == "triton-http-binary":
        return as_outputs(triton_http_infer(front, image, parameters, binary=True), client)
    return as_outputs(triton_grpc_infer(front, image, parameters), "grpc")


CLIENTS = ["triton-http-json", "triton-http-binary", "triton-grpc"]


def reference_predictions(front: Front, image: bytes) -> list[dict]:
    reply = front.torchserve("predictions", {"image": b64(image)})
    assert reply.status == 200, reply.text
    return reply.json()["predictions"]


def reference_map(front: Front, image: bytes, method: str, target: int) -> np.ndarray:
    """TorchServe's own npy-f16 attributions for the method, reduced as the spec says (positive,
    max_abs) by serving's torch implementation, as FP16 [H, W]."""
    reply = front.torchserve("predictions", {"image": b64(image), "explain": [method], "target": target,
                                             "render": {"encoding": "npy-f16"}})
    assert reply.status == 200, reply.text
    raw = np.load(io.BytesIO(base64.b64decode(reply.json()["explanations"][method]["data"])))
    reduced = reduce_channels(torch.from_numpy(raw.astype(np.float32)), reduce="max_abs", polarity="positive")
    return reduced.numpy().astype(np.float16)


# -- health and metadata ----------------------------------------------------------------------


def test_health_and_metadata_with_every_client(front):
    http = tritonhttp.InferenceServerClient(front.host_port)
    grpc = tritongrpc.InferenceServerClient(front.grpc)
    for client in (http, grpc):
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("shapes")
        assert not client.is_model_ready("no-such-model") if client is http else True
    server = http.get_server_metadata()
    assert server["name"] == "torchserve-xai" and "binary_tensor_data" in server["extensions"]
    assert grpc.get_server_metadata().name == "torchserve-xai"
    model = http.get_model_metadata("shapes")
    assert model["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    outputs = {output["name"]: (output["datatype"], output["shape"]) for output in model["outputs"]}
    assert outputs["scores"] == ("FP32", [-1, -1]) and outputs["labels"] == ("BYTES", [-1, -1])
    metadata = front.describe()["customizedMetadata"]
    allowed = (json.loads(metadata) if isinstance(metadata, str) else metadata)["allowed_explainers"]
    assert len(allowed) > 5  # every registered explainer, in the demo's config
    assert set(outputs) == {"scores", "labels", "indices"} | {f"explanation.{name}" for name in allowed}
    assert all(outputs[f"explanation.{name}"] == ("FP16", [1, -1, -1]) for name in allowed)
    grpc_model = grpc.get_model_metadata("shapes")
    assert [(t.name, t.datatype, list(t.shape)) for t in grpc_model.inputs] == [("image", "BYTES", [-1])]
    assert {t.name for t in grpc_model.outputs} == set(outputs)
    # Plain HTTP: the exact bodies a probe or load balancer sees.
    assert http_request(front.url + "/v2/health/ready").json() == {"ready": True}
    assert http_request(front.url + "/v2/models/shapes/ready").json() == {"name": "shapes", "ready": True}
    missing = http_request(front.url + "/v2/models/nope/ready")
    assert missing.status == 404 and set(missing.json()) == {"error"}


# -- predict ----------------------------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
def test_predict_scores_equal_torchserves_own(front, client):
    image = shape_png("triangle")
    outputs = infer_with(client, front, image)
    assert set(outputs) == {"scores", "labels", "indices"}
    expected = reference_predictions(front, image)
    scores, labels, indices = outputs["scores"][0], outputs["labels"][0], outputs["indices"][0]
    assert scores.dtype == np.float32 and scores.shape == (1, len(expected))
    np.testing.assert_array_equal(scores[0], np.array([p["score"] for p in expected], dtype=np.float32))
    assert [label.decode() if isinstance(label, bytes) else label for label in labels[0]] == [p["label"] for p in expected]
    assert indices.dtype == np.int64 and indices[0].tolist() == [p["index"] for p in expected]
    assert expected[0]["label"] == "triangle"


def test_a_batch_of_images_is_n_rows_in_request_order(front):
    images = [shape_png(shape) for shape in ("star", "circle", "cross")]
    client = tritonhttp.InferenceServerClient(front.host_port)
    tensor = tritonhttp.InferInput("image", [3], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    result = client.infer("shapes", [tensor])
    assert [row[0].decode() for row in result.as_numpy("labels")] == ["star", "circle", "cross"]
    for row, image in zip(result.as_numpy("scores"), images):
        np.testing.assert_array_equal(row, np.array([p["score"] for p in reference_predictions(front, image)], np.float32))


# -- explanations as tensors ------------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
def test_two_explanations_are_fp16_tensors_equal_to_torchserves_maps(front, client):
    image = shape_png("square")
    outputs = infer_with(client, front, image, {"explain": "grad_cam,guided_backprop"})
    assert set(outputs) == {"scores", "labels", "indices", "explanation.grad_cam", "explanation.guided_backprop"}
    top = int(outputs["indices"][0][0][0])
    assert CLASSES[top] == "square"
    for method in ("grad_cam", "guided_backprop"):
        data, parameters = outputs[f"explanation.{method}"]
        assert data.dtype == np.float16 and data.shape == (1, 64, 64)
        assert np.isfinite(data).all() and data.max() > 0 and data.min() >= 0  # positive polarity
        assert parameters["method"] == method and parameters["encoding"] == "fp16"
        assert parameters["target_index"] == top and parameters["target_label"] == "square"
        scale = json.loads(parameters["scale"])
        assert scale["max"] > scale["min"] == 0.0
        assert scale["max"] <= float(data.max()) * 1.01  # the display range clips at a percentile <= the max
        np.testing.assert_array_equal(data[0], reference_map(front, image, method, top))
        assert json.loads(parameters["sanity"]).keys() >= {"class_sensitive"}
    guided = outputs["explanation.guided_backprop"][1]
    assert json.loads(guided["rule_sites"])  # where the backward rule was applied
    grad_cam = outputs["explanation.grad_cam"][1]
    assert grad_cam["layer"] and "rule_sites" not in grad_cam  # a CAM names its layer and applies no rule


def test_target_fp32_and_png_encodings(front):
    image = shape_png("circle")
    fp32 = infer_with("triton-http-json", front, image, {"explain": "grad_cam", "target": "star", "encoding": "fp32"})
    data, parameters = fp32["explanation.grad_cam"]
    assert data.dtype == np.float32 and data.shape == (1, 64, 64) and parameters["target_label"] == "star"
    np.testing.assert_array_equal(data[0].astype(np.float16), reference_map(front, image, "grad_cam", CLASSES.index("star")))
    png = infer_with("triton-grpc", front, image, {"explain": "grad_cam", "encoding": "png"})
    (picture,), parameters = png["explanation.grad_cam"]
    assert parameters["encoding"] == "png"
    assert Image.open(io.BytesIO(picture)).size == (64, 64)


def test_the_explain_route_uses_the_models_default_explainers(front):
    """REST /v2/models/{m}/explain (our addition; KServe's v2 has no explain route), JSON with PNGs
    as base64 text, through KServe's client to an explicit URL."""
    document = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(shape_png("cross"))]}],
                "parameters": {"encoding": "png"}}
    reply = http_request(front.url + "/v2/models/shapes/explain", "POST", json.dumps(document).encode(), JSON,
                         timeout=120)
    assert reply.status == 200, reply.text
    outputs = {output["name"]: output for output in reply.json()["outputs"]}
    assert set(outputs) == {"scores", "labels", "indices", "explanation.guided_backprop", "explanation.grad_cam"}
    for name in ("explanation.guided_backprop", "explanation.grad_cam"):
        assert outputs[name]["datatype"] == "BYTES" and outputs[name]["shape"] == [1]
        assert Image.open(io.BytesIO(base64.b64decode(outputs[name]["data"][0]))).size == (64, 64)
        assert outputs[name]["parameters"]["target_label"] == "cross"


# -- client errors: 4xx with an OIP error body, never a 5xx ----------------------------------


def tensor_document(name="image", datatype="BYTES", data=None, parameters=None) -> bytes:
    tensor = {"name": name, "shape": [1], "datatype": datatype, "data": data or [b64(shape_png("circle"))]}
    return json.dumps({"inputs": [tensor], **({"parameters": parameters} if parameters else {})}).encode()


MALFORMED = {
    # case: (body, expected status, words the message must contain)
    "wrong input name": (tensor_document(name="img"), 400, "'image'"),
    "wrong datatype": (tensor_document(datatype="FP32", data=[1.0]), 400, "BYTES"),
    "corrupt image": (tensor_document(data=[b64(b"this is not an image")]), 400, "invalid_image"),
    "unknown explainer": (tensor_document(parameters={"explain": "telepathy"}), 400, "unknown_explainer"),
    "refused cost cap": (tensor_document(parameters={"explain": "occlusion",
                                                     "options": json.dumps({"occlusion": {"window": 2, "stride": 1}})}),
                         422, "cost_cap_exceeded"),
    "unknown encoding": (tensor_document(parameters={"explain": "grad_cam", "encoding": "jpeg"}), 400, "encoding"),
    "unknown parameter": (tensor_document(parameters={"explian": "grad_cam"}), 400, "explian"),
    "not JSON": (b"{not json", 400, "malformed"),
    "no inputs": (b'{"id": "x"}', 400, "inputs"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_requests_get_a_4xx_oip_error_body(front, case):
    body, status, words = MALFORMED[case]
    reply = http_request(front.url + "/v2/models/shapes/infer", "POST", body, JSON, timeout=120)
    assert reply.status == status, (case, reply.status, reply.text)
    document = reply.json()
    assert set(document) == {"error"} and isinstance(document["error"], str) and words in document["error"], document


def test_clients_see_the_errors_as_their_own_4xx(front):
    image, corrupt = shape_png("star"), b"GIF89a but no more"
    for binary in (False, True):
        with pytest.raises(InferenceServerException) as wrong_name:
            triton_http_infer(front, image, binary=binary, name="pixels")
        assert wrong_name.value.status() == "400" and "'image'" in wrong_name.value.message()
        with pytest.raises(InferenceServerException) as bad_image:
            triton_http_infer(front, corrupt, binary=binary)
        assert bad_image.value.status() == "400" and "invalid_image" in bad_image.value.message()
    with pytest.raises(InferenceServerException) as capped:
        triton_http_infer(front, image, {"explain": "occlusion", "options": json.dumps({"occlusion": {"window": 2, "stride": 1}})},
                          binary=True)
    assert capped.value.status() == "422" and "cost_cap_exceeded" in capped.value.message()
    for problem in ({"name": "pixels"}, {"image": corrupt}, {"parameters": {"explain": "telepathy"}}):
        with pytest.raises(InferenceServerException) as grpc_error:
            triton_grpc_infer(front, problem.get("image", image), problem.get("parameters"), problem.get("name", "image"))
        assert grpc_error.value.status() == "StatusCode.INVALID_ARGUMENT", grpc_error.value


def test_v1_explain_does_not_echo_the_requests_headers(front):
    """KServe's own v1 explain call returns the request's headers as the response's."""
    body = json.dumps({"instances": [b64(shape_png("circle"))]}).encode()
    reply = http_request(front.url + "/v1/models/shapes:explain", "POST", body,
                         {**JSON, "Authorization": "Bearer secret", "X-Probe": "echo?"}, timeout=120)
    assert reply.status == 200, reply.text
    assert not {"authorization", "x-probe"} & {name.lower() for name in reply.headers}
    assert reply.json()["explanations"][0]["predictions"][0]["label"] == "circle"


# -- KServe's SDK ------------------------------------------------------------------------------


def test_kserve_sdk_health_predict_explain_v1_and_errors(front):
    results = kserve_sdk(front)
    assert results["live"] is True and results["ready"] is True and results["model_ready"] is True
    for encoding in ("json", "binary"):
        outputs = results[f"predict_{encoding}"]
        expected = reference_predictions(front, shape_png("triangle"))
        np.testing.assert_array_equal(sdk_array(outputs["scores"])[0], np.array([p["score"] for p in expected], np.float32))
        assert outputs["labels"]["data"] == [p["label"] for p in expected], encoding
    explained = results["explain_binary"]
    top = explained["indices"]["data"][0]
    for method in ("grad_cam", "saliency"):
        tensor = explained[f"explanation.{method}"]
        assert tensor["datatype"] == "FP16" and tensor["shape"] == [1, 64, 64]
        assert tensor["parameters"]["target_label"] == "square" and json.loads(tensor["parameters"]["scale"])["max"] > 0
        np.testing.assert_array_equal(sdk_array(tensor)[0], reference_map(front, shape_png("square"), method, top))
    route = {output["name"]: output for output in results["explain_route_json"]["outputs"]}
    assert set(route) == {"scores", "labels", "indices", "explanation.guided_backprop", "explanation.grad_cam"}
    assert route["explanation.grad_cam"]["datatype"] == "FP32" and route["explanation.grad_cam"]["shape"] == [1, 64, 64]
    assert [body["predictions"][0]["label"] for body in results["v1_predict"]["predictions"]] == ["star", "star"]
    assert set(results["v1_explain"]["explanations"][0]["explanations"]) == {"guided_backprop", "grad_cam"}
    assert results["corrupt"]["status"] == 400 and "invalid_image" in results["corrupt"]["body"]["error"]
    assert results["capped"]["status"] == 422 and "cost_cap_exceeded" in results["capped"]["body"]["error"]


def test_an_expired_inference_key_is_renewed_through_torchserves_token_api(deployments):
    """TorchServe's keys expire after token_expiration_min: the front server, refused, asks the
    token API for a new inference key with the API key and retries. Simulated by making the key it
    reads wrong (an expired key is refused the same way: 400 InvalidKeyException)."""
    stack = deployments["stack"]
    key_file = stack.front.key_file
    keys = json.loads(key_file.read_text())
    refused = http_request(f"{stack.front.torchserve_url}/ping", headers={"Authorization": "Bearer not-the-key"})
    assert refused.status == 400 and refused.json()["type"] == "InvalidKeyException"
    keys["inference"]["key"] = "not-the-key"
    key_file.write_text(json.dumps(keys))
    time.sleep(1.1)  # past the front server's readiness cache
    outputs = infer_with("triton-http-binary", stack.front, shape_png("cross"))
    assert outputs["labels"][0][0][0] == b"cross"
    renewed = json.loads(key_file.read_text())["inference"]["key"]
    assert renewed not in ("not-the-key", "") and http_request(stack.front.url + "/v2/health/ready").status == 200


# -- the make target's process handling (last: it stops the stack) ---------------------------


def test_ctrl_c_stops_the_whole_stack_and_leaves_no_process(deployments):
    stack = deployments["stack"]
    assert "Serving shapes over the Open Inference Protocol" in stack.output()
    assert f"REST: {stack.front.url}" in stack.output() and f"gRPC: {stack.front.grpc}" in stack.output()
    tree = stack.tree()
    assert len(tree) >= 4  # the tool, the front server, TorchServe's launcher, Java, a worker
    assert stack.interrupt() == 0, stack.output()[-3000:]
    deadline = time.monotonic() + 10
    while (alive := [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive == [], alive
    assert not stack.front.key_file.exists()  # the token file went with TorchServe
