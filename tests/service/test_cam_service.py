"""The CAM family through the request service: each method rendered, and every gradient CAM of one
request served from one forward pass of the model."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from serving.requests import RawRequest
from serving.service import ExplanationService
from serving.settings import ServingSettings
from support.models import ModuleReluNet, seeded

CLASSES = ["circle", "square", "triangle", "cross"]
NEW_CAMS = ["grad_cam_plus_plus", "xgrad_cam", "hires_cam", "layer_cam", "normgrad", "eigen_cam", "score_cam",
            "ablation_cam"]
GRADIENT_CAMS = ["grad_cam", "grad_cam_plus_plus", "xgrad_cam", "hires_cam", "layer_cam", "normgrad"]


def _png() -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _request(**fields) -> RawRequest:
    return RawRequest({"body": {"image": base64.b64encode(_png()).decode(), **fields}}, {}, False)


def _service(model, **caps) -> ExplanationService:
    return ExplanationService(model, ServingSettings.from_mapping(
        {"input_size": [16, 16], "class_names": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3, "caps": caps}))


@pytest.mark.parametrize("name", NEW_CAMS)
def test_each_cam_is_rendered(name):
    service = _service(seeded(ModuleReluNet()))
    png, as_json = service.handle([_request(explain=[name]), _request(explain=[name], encoding="json")])
    assert png.status == 200 and as_json.status == 200, (png.body, as_json.body)
    entry = png.body["explanations"][name]
    assert Image.open(io.BytesIO(base64.b64decode(entry["data"]))).size == (16, 16)
    assert entry["layer"] == "head.0"  # the default layer: the last feature map (2x2) the output depends on
    data = np.array(as_json.body["explanations"][name]["data"])
    assert data.shape == (16, 16) and np.isfinite(data).all() and data.min() >= 0 and data.max() > 0


def test_every_gradient_cam_in_one_request_runs_the_model_forward_once():
    model = seeded(ModuleReluNet())
    service = _service(model, max_explainers_per_request=len(GRADIENT_CAMS))
    # The first request builds the model's rule model and finds its default CAM layer (one forward each).
    service.handle([_request(explain=["grad_cam"])])
    rows = []
    handle = model.head[-1].register_forward_pre_hook(lambda _module, args: rows.append(int(args[0].shape[0])))
    try:
        (reply,) = service.handle([_request(explain=GRADIENT_CAMS)])
    finally:
        handle.remove()
    assert reply.status == 200 and set(reply.body["explanations"]) == set(GRADIENT_CAMS), reply.body
    assert rows == [1]  # one forward of the one image: the prediction's, shared by all six maps
