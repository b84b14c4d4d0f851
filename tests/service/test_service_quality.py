"""The per-request "quality" flag in the serving layer: scores, caps, metrics."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import explainers
from serving.metrics import prometheus_metrics
from serving.requests import RawRequest
from serving.service import ExplanationService
from serving.settings import ServingSettings
from support.models import ModuleReluNet, seeded
from test_service import CLASSES, json_request, png_bytes, settings


@pytest.fixture
def model():
    return seeded(ModuleReluNet(classes=4))


def model_input(image_bytes: bytes) -> torch.Tensor:
    """The service's preprocessing, written out (16x16 bilinear, mean 0.5, std 0.25)."""
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB").resize((16, 16), Image.BILINEAR)
    return (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None] - 0.5) / 0.25


def reference_deletion_auc(model, x: torch.Tensor, method: str, target: int, steps: int) -> float:
    """Deletion to 0 in a plain loop: pixels by Σ_c |a_c|, one forward per step, trapezoid by hand."""
    attributions = explainers.create(method, model).explain(x, target).attributions[0]
    importance = attributions.abs().sum(dim=0).flatten().tolist()
    order = sorted(range(len(importance)), key=lambda p: (-importance[p], p))
    width, probabilities = x.shape[-1], []
    for k in range(steps + 1):
        frame = x[0].clone()
        for p in order[: round(k * len(order) / steps)]:
            frame[:, p // width, p % width] = 0.0
        with torch.no_grad():
            probabilities.append(torch.softmax(model(frame[None]), dim=1)[0, target].item())
    return sum((a + b) / 2 for a, b in zip(probabilities, probabilities[1:])) / steps


def test_quality_is_off_by_default(model):
    metrics = prometheus_metrics()
    reply = ExplanationService(model, settings(), metrics).handle([json_request(explain=["saliency"])])[0]
    assert reply.status == 200 and "quality" not in reply.body["explanations"]["saliency"]
    assert metrics.recorder.registry.get_sample_value(
        "xai_explanation_quality_count", {"explainer": "saliency", "metric": "deletion_auc"}) is None


def test_quality_scores_match_a_plain_reference_and_are_recorded(model):
    metrics = prometheus_metrics()
    service = ExplanationService(model, settings(), metrics)
    image = png_bytes(seed=4)
    default_steps, four_steps, top_two = service.handle([
        json_request(image=_b64(image), explain=["saliency", "grad_cam"], quality=True),
        json_request(image=_b64(image), explain=["guided_backprop"], quality={"steps": 4}),
        json_request(image=_b64(image), explain=["saliency"], explain_top_k=2, quality=True)])
    x = model_input(image)
    recorded = []
    for method in ("saliency", "grad_cam"):
        entry = default_steps.body["explanations"][method]
        expected = reference_deletion_auc(model, x, method, entry["target"]["index"], steps=8)  # the default
        assert entry["quality"] == {"deletion_auc": pytest.approx(expected, abs=1e-4)}
        recorded.append((method, entry["quality"]["deletion_auc"]))
    entry = four_steps.body["explanations"]["guided_backprop"]
    assert entry["quality"]["deletion_auc"] == pytest.approx(
        reference_deletion_auc(model, x, "guided_backprop", entry["target"]["index"], steps=4), abs=1e-4)
    recorded.append(("guided_backprop", entry["quality"]["deletion_auc"]))
    for entry in top_two.body["explanations"]["saliency"]:  # each class its own score
        assert entry["quality"]["deletion_auc"] == pytest.approx(
            reference_deletion_auc(model, x, "saliency", entry["target"]["index"], steps=8), abs=1e-4)
        recorded.append(("saliency", entry["quality"]["deletion_auc"]))
    registry = metrics.recorder.registry
    for method in ("saliency", "grad_cam", "guided_backprop"):
        values = [value for name, value in recorded if name == method]
        labels = {"explainer": method, "metric": "deletion_auc"}
        assert registry.get_sample_value("xai_explanation_quality_count", labels) == len(values)
        assert registry.get_sample_value("xai_explanation_quality_sum", labels) == pytest.approx(sum(values), abs=1e-3)


def test_quality_as_a_form_field_beside_raw_bytes(model):
    service = ExplanationService(model, settings())
    reply = service.handle([_form(png_bytes(), quality=b"true", headers={"X-Explain": "saliency"})])[0]
    assert reply.status == 200 and 0 <= reply.body["explanations"]["saliency"]["quality"]["deletion_auc"] <= 1
    off = service.handle([_form(png_bytes(), quality="false", headers={"X-Explain": "saliency"})])[0]
    assert "quality" not in off.body["explanations"]["saliency"]


def test_quality_requests_are_capped_and_checked(model):
    service = ExplanationService(model, settings())
    cases = {
        "over the cap": (json_request(explain=["saliency"], quality={"steps": 17}), 422, "cost_cap_exceeded"),
        "nothing to score": (json_request(quality=True), 400, "invalid_request"),
        "not a flag": (json_request(explain=["saliency"], quality="yes"), 400, "invalid_request"),
        "zero steps": (json_request(explain=["saliency"], quality={"steps": 0}), 400, "invalid_request"),
        "unknown key": (json_request(explain=["saliency"], quality={"steps": 4, "metric": "insertion"}), 400, "invalid_request"),
    }
    replies = service.handle([case[0] for case in cases.values()])
    for (name, (_, status, code)), reply in zip(cases.items(), replies):
        assert (reply.status, reply.body["error"]["code"]) == (status, code), (name, reply.body)
    assert replies[0].body["error"]["cap"] == "max_quality_steps"
    off = ExplanationService(model, settings(caps={"max_quality_steps": 0}))
    reply = off.handle([json_request(explain=["saliency"], quality=True)])[0]
    assert (reply.status, reply.body["error"]["cap"]) == (422, "max_quality_steps")
    assert off.handle([json_request(explain=["saliency"])])[0].status == 200  # explanations still served


def test_quality_settings_are_validated_at_load():
    base = {"input_size": [16, 16], "class_names": CLASSES}
    assert ServingSettings.from_mapping({**base, "quality_steps": 12}).quality_steps == 12
    assert ServingSettings.from_mapping({**base, "caps": {"max_quality_steps": 0}}).caps.max_quality_steps == 0
    for bad in ({"quality_steps": 0}, {"quality_steps": True}, {"quality_steps": 20},  # 20 > default cap 16
                {"caps": {"max_quality_steps": -1}}, {"caps": {"max_quality_steps": False}}):
        with pytest.raises(explainers.InvalidOptionError):
            ServingSettings.from_mapping({**base, **bad})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _form(image: bytes, headers: dict, **fields) -> RawRequest:
    """Multipart-style request: the image in field "data", other fields as they arrive (text or bytes)."""
    return RawRequest({"data": image, **fields}, headers)
