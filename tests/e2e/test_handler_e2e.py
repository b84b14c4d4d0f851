"""The explainer handler in a real TorchServe, over real HTTP."""

from __future__ import annotations

import base64
import io
import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tools.demo_server import add_enveloped_model, b64, build_store, post_json, running_server, shape_png
from support.replies import without_timing

PNG = {"Content-Type": "image/png"}
CLASSES = ["circle", "square", "triangle", "cross", "star"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    with running_server(store, tmp_path_factory.mktemp("run"), {"shapes": "shapes.mar"}) as server:
        yield server


def decoded_png(entry) -> Image.Image:
    assert entry["encoding"] in ("png", "overlay")
    return Image.open(io.BytesIO(base64.b64decode(entry["data"])))


def multipart(field: str, data: bytes) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"image.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_every_request_form_predicts_the_drawn_shape(server):
    image = shape_png("circle")
    body, headers = multipart("data", image)
    replies = {
        "raw": server.request("POST", "/predictions/shapes", image, PNG),
        "multipart": server.request("POST", "/predictions/shapes", body, headers),
        "json": post_json(server, "/predictions/shapes", {"image": b64(image)}),
    }
    for form, reply in replies.items():
        assert reply.status == 200, (form, reply.text)
        document = reply.json()
        assert set(document) == {"predictions"}, form
        assert document["predictions"][0]["label"] == "circle", form
        assert len(document["predictions"]) == 3
    assert len({json.dumps(r.json()) for r in replies.values()}) == 1


@pytest.mark.parametrize("shape", CLASSES)
def test_a_large_noisy_jpeg_of_each_shape(server, shape):
    jpeg = shape_png(shape, size=300, fmt="JPEG", noise_std=0.05, foreground=(0.2, 0.8, 0.3), background=(0.05, 0.05, 0.3))
    reply = server.request("POST", "/predictions/shapes", jpeg, {"Content-Type": "image/jpeg"})
    assert reply.status == 200 and reply.json()["predictions"][0]["label"] == shape


def test_explanations_route_returns_the_default_explainers(server):
    reply = server.request("POST", "/explanations/shapes", shape_png("square"), PNG)
    assert reply.status == 200, reply.text
    document = reply.json()
    assert document["predictions"][0]["label"] == "square"
    assert set(document["explanations"]) == {"guided_backprop", "grad_cam"}
    for entry in document["explanations"].values():
        assert entry["target"] == {"index": 1, "label": "square"}
        assert decoded_png(entry).size == (64, 64)
        assert entry["scale"]["max"] > entry["scale"]["min"]


def test_opt_in_by_header_and_by_json_field(server):
    image = shape_png("triangle")
    by_header = server.request("POST", "/predictions/shapes", image, {**PNG, "X-Explain": "saliency,deconvnet"})
    by_field = post_json(server, "/predictions/shapes", {"image": b64(image), "explain": ["saliency", "deconvnet"]})
    for reply in (by_header, by_field):
        assert reply.status == 200, reply.text
        assert set(reply.json()["explanations"]) == {"saliency", "deconvnet"}
    assert without_timing(by_header.json()) == without_timing(by_field.json())


def test_each_encoding_decodes(server):
    image = shape_png("star")
    replies = {encoding: post_json(server, "/predictions/shapes", {"image": b64(image), "explain": ["guided_backprop"], "encoding": encoding})
               for encoding in ("png", "overlay", "npy-f16", "json")}
    entries = {encoding: reply.json()["explanations"]["guided_backprop"] for encoding, reply in replies.items()}
    assert decoded_png(entries["png"]).size == (64, 64)
    overlay = decoded_png(entries["overlay"])
    assert overlay.size == (64, 64) and overlay.mode == "RGB"
    array = np.load(io.BytesIO(base64.b64decode(entries["npy-f16"]["data"])))
    assert array.dtype == np.float16 and array.shape == (3, 64, 64) and np.abs(array).sum() > 0
    assert np.asarray(entries["json"]["data"]).shape == (64, 64)
    # Polarity "positive": the pixel of the largest positive attribution is at the top of the scale
    # (a palette PNG's indices are its pixel values).
    strongest = np.unravel_index(np.clip(array.astype(np.float32), 0, None).max(0).argmax(), (64, 64))
    png = decoded_png(entries["png"])
    assert png.mode == "P" and np.asarray(png)[strongest] == 255


def test_target_by_index_label_and_top_k(server):
    image = shape_png("cross")
    by_label = post_json(server, "/predictions/shapes", {"image": b64(image), "explain": ["saliency"], "target": "star"}).json()
    by_index = post_json(server, "/predictions/shapes", {"image": b64(image), "explain": ["saliency"], "target": 4}).json()
    assert by_label["explanations"]["saliency"]["target"] == {"index": 4, "label": "star"}
    assert without_timing(by_label) == without_timing(by_index)
    top = post_json(server, "/predictions/shapes", {"image": b64(image), "explain": ["grad_cam"], "explain_top_k": 2}).json()
    ranked = [p["index"] for p in top["predictions"]]
    assert [e["target"]["index"] for e in top["explanations"]["grad_cam"]] == ranked[:2]


ERROR_CASES = [
    ({"image": "not base64!"}, 400, "invalid_request"),
    ({"explain": ["saliency"]}, 400, "invalid_request"),
    ({"image": b64(b"\x89PNG\r\n\x1a\n truncated")}, 400, "invalid_image"),
    ({"image": b64(shape_png()), "explain": ["lime"]}, 400, "unknown_explainer"),
    ({"image": b64(shape_png()), "explain": ["saliency"], "target": "hexagon"}, 400, "invalid_target"),
    ({"image": b64(shape_png()), "explain": ["integrated_gradients"], "options": {"integrated_gradients": {"n_steps": 10_000_000}}}, 422, "cost_cap_exceeded"),
]


def test_concurrent_mixed_burst_is_batched_and_each_reply_is_its_own(server):
    before = inference_observations(server)
    jobs = []
    for i in range(24):
        shape = CLASSES[i % 5]
        if i % 4 == 0:
            jobs.append(("error", ERROR_CASES[(i // 4) % len(ERROR_CASES)]))
        elif i % 4 == 1:
            jobs.append(("explain", shape))
        else:
            jobs.append(("plain", shape))

    def send(job):
        kind, detail = job
        if kind == "error":
            return post_json(server, "/predictions/shapes", detail[0])
        if kind == "explain":
            return post_json(server, "/predictions/shapes", {"image": b64(shape_png(detail)), "explain": ["grad_cam"], "target": detail})
        return server.request("POST", "/predictions/shapes", shape_png(detail), PNG)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(send, jobs))
    for (kind, detail), reply in zip(jobs, replies):
        if kind == "error":
            _, status, code = detail
            assert (reply.status, reply.json()["error"]["code"]) == (status, code), reply.text
        elif kind == "explain":
            assert reply.status == 200
            assert reply.json()["explanations"]["grad_cam"]["target"]["label"] == detail
        else:
            assert reply.status == 200 and set(reply.json()) == {"predictions"}
            assert reply.json()["predictions"][0]["label"] == detail
    plain = sum(kind == "plain" for kind, _ in jobs)
    explained = sum(kind == "explain" for kind, _ in jobs)
    forwards = settled_inference_observations(server) - before
    # Each explained request runs its own forward; plain requests of one batch share one.
    assert explained < forwards < explained + plain, "plain requests were never batched together"


def settled_inference_observations(server, timeout: float = 5.0) -> int:
    """The count once it stops changing: the worker hands its metric lines over every 50 ms."""
    deadline, last = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        current = inference_observations(server)
        if current == last:
            return current
        last = current
        time.sleep(0.3)
    return last


def inference_observations(server) -> int:
    text = server.request("GET", "/metrics", api="metrics").text
    pattern = r'xai_stage_latency_seconds_count\{[^}]*stage="inference"[^}]*\} ([0-9.e+]+)'
    return int(sum(float(value) for value in re.findall(pattern, text)))


@pytest.mark.parametrize("envelope", ["kserve", "kservev2"])
def test_kserve_envelopes(store, tmp_path_factory, envelope):
    name = add_enveloped_model(store, envelope)
    image = b64(shape_png("triangle"))
    with running_server(store, tmp_path_factory.mktemp(envelope), {name: f"{name}.mar"}, service_envelope=envelope) as server:
        if envelope == "kserve":
            predict = post_json(server, f"/v1/models/{name}:predict", {"instances": [{"data": image}, {"data": image}]})
            explain = post_json(server, f"/v1/models/{name}:explain", {"instances": [{"data": image}]})
            assert predict.status == 200, predict.text
            assert [p["predictions"][0]["label"] for p in predict.json()["predictions"]] == ["triangle", "triangle"]
            explanations = explain.json()["explanations"][0]
        else:
            tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}
            predict = post_json(server, f"/v2/models/{name}/infer", {"id": "r1", "inputs": [tensor]})
            explain = post_json(server, f"/v2/models/{name}/explain", {"id": "r2", "inputs": [tensor]})
            assert predict.status == 200, predict.text
            output = predict.json()["outputs"][0]
            assert output["datatype"] == "BYTES"
            assert json.loads(output["data"][0])["predictions"][0]["label"] == "triangle"
            explanations = json.loads(explain.json()["outputs"][0]["data"][0])
        assert explain.status == 200, explain.text
        assert set(explanations["explanations"]) == {"guided_backprop", "grad_cam"}
        assert decoded_png(explanations["explanations"]["grad_cam"]).size == (64, 64)
