"""Cost caps bound every explainer by the cost it states, built-in or registered; the stated cost is
what the method really runs."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image
from torch import nn

import explainers
from explainers import Cost, Explainer, registry
from explainers.errors import CostCapExceededError
from serving.caps import CostCaps, check_cost
from serving.requests import RawRequest
from serving.service import ExplanationService
from serving.settings import ServingSettings
from support.models import ModuleReluNet, seeded

CLASSES = [f"c{i}" for i in range(10)]


class RowCounter:
    """Counts the rows that reach the model's output layer: every evaluation does, whatever path
    (traced, fallback, Captum) runs it, and whatever shortcuts run the layers before it."""

    def __init__(self, layer: nn.Module):
        self.rows = 0
        self.handle = layer.register_forward_pre_hook(self.count)

    def count(self, _module, args):
        self.rows += int(args[0].shape[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


METHOD_OPTIONS = {
    "saliency": {},
    "guided_backprop": {},
    "guided_grad_cam": {},
    "integrated_gradients": {"n_steps": 12, "internal_batch_size": 5},
    "smoothgrad": {"samples": 7, "batch_size": 3},
    "occlusion": {"window": 6, "stride": 5, "perturbations_per_eval": 4},
    "grad_cam_plus_plus": {},
    "eigen_cam": {},
    "normgrad": {"layers": ["features.1", "features.6"]},
    # ModuleReluNet's default layer has 8 channels: 5 of them weighed, 2 rows per forward.
    "score_cam": {"max_channels": 5, "batch_size": 2},
    "ablation_cam": {"max_channels": 5, "batch_size": 2},
}


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_stated_cost_is_what_the_method_runs(method):
    # One forward is the prediction's, shared by every method; the stated evaluations come on top.
    model = seeded(ModuleReluNet())
    explainer = explainers.create(method, model, **METHOD_OPTIONS[method])
    explainer.explain(torch.randn(1, 3, 16, 16), target=1)  # the model's rule model is built (and checked) once
    cost = explainer.cost(16, 16)
    largest = []
    model.head[-1].register_forward_pre_hook(lambda _m, args: largest.append(int(args[0].shape[0])))
    with RowCounter(model.head[-1]) as counter:
        explainer.explain(torch.randn(1, 3, 16, 16), target=1)
    assert counter.rows == 1 + cost.evaluations, (counter.rows, cost)
    assert max(largest[1:], default=1) <= cost.rows_per_forward, (largest, cost)


def _png(side: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


class CostlyMethod(Explainer):
    """A third-party explainer the server knows nothing about but what it states."""

    def __init__(self, model, *, passes: int = 1):
        super().__init__(model)
        self.passes = passes

    def cost(self, height, width):
        return Cost(evaluations=self.passes, backward_passes=0, rows_per_forward=self.passes,
                    evaluations_option="passes", batch_option="passes")

    def attribute(self, inputs, targets):
        return torch.zeros_like(inputs)


@pytest.fixture(autouse=True)
def costly_method_registered(monkeypatch):
    """Registered for this module's tests only: other tests read the registry's contract names."""
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    registry.register("test_costly_method")(CostlyMethod)


def test_a_registered_explainer_is_capped_by_its_stated_cost():
    caps = CostCaps(max_evaluations_per_explanation=10, max_batch_per_forward=20)
    model = seeded(ModuleReluNet())
    check_cost(explainers.create("test_costly_method", model, passes=10), caps, (16, 16))
    with pytest.raises(CostCapExceededError) as caught:
        check_cost(explainers.create("test_costly_method", model, passes=11), caps, (16, 16))
    assert caught.value.cap == "max_evaluations_per_explanation" and "passes" in caught.value.message
    caps = CostCaps(max_evaluations_per_explanation=100, max_batch_per_forward=8)
    with pytest.raises(CostCapExceededError) as caught:
        check_cost(explainers.create("test_costly_method", model, passes=9), caps, (16, 16))
    assert caught.value.cap == "max_batch_per_forward"


def test_the_service_refuses_it_with_a_422_naming_the_cap():
    settings = ServingSettings.from_mapping({"input_size": [16, 16], "class_names": CLASSES,
                                             "caps": {"max_evaluations_per_explanation": 4}})
    service = ExplanationService(seeded(ModuleReluNet()), settings)
    document = {"image": base64.b64encode(_png()).decode(), "explain": ["test_costly_method"],
                "options": {"test_costly_method": {"passes": 5}}}
    (reply,) = service.handle([RawRequest({"body": json.dumps(document).encode()}, {}, False)])
    assert reply.status == 422 and reply.error_code == "cost_cap_exceeded"
    assert reply.body["error"]["cap"] == "max_evaluations_per_explanation"
    document["options"]["test_costly_method"]["passes"] = 4
    (reply,) = service.handle([RawRequest({"body": json.dumps(document).encode()}, {}, False)])
    assert reply.status == 200 and reply.error_code is None, reply.body


@pytest.mark.parametrize("method", ["score_cam", "ablation_cam"])
def test_the_service_refuses_too_many_channels_with_the_typed_error(method):
    settings = ServingSettings.from_mapping({"input_size": [16, 16], "class_names": CLASSES})
    service = ExplanationService(seeded(ModuleReluNet()), settings)
    document = {"image": base64.b64encode(_png()).decode(), "explain": [method],
                "options": {method: {"max_channels": 300}}}
    (reply,) = service.handle([RawRequest({"body": json.dumps(document).encode()}, {}, False)])
    assert reply.status == 422 and reply.error_code == "cost_cap_exceeded"
    assert reply.body["error"]["cap"] == "max_evaluations_per_explanation" and "max_channels" in reply.body["error"]["message"]
    document["options"][method] = {"max_channels": 200, "batch_size": 200}
    (reply,) = service.handle([RawRequest({"body": json.dumps(document).encode()}, {}, False)])
    assert reply.status == 422 and reply.body["error"]["cap"] == "max_batch_per_forward"
    document["options"][method] = {"max_channels": 200}  # stated 200 (the layer unseen yet), within the caps
    (reply,) = service.handle([RawRequest({"body": json.dumps(document).encode()}, {}, False)])
    assert reply.status == 200, reply.body


def test_named_caps_keep_bounding_their_methods():
    caps = CostCaps(max_integrated_gradients_steps=8, max_smoothgrad_samples=4, max_occlusion_evaluations=9)
    model = seeded(ModuleReluNet())
    for method, options, cap in (("integrated_gradients", {"n_steps": 9}, "max_integrated_gradients_steps"),
                                 ("smoothgrad", {"samples": 5}, "max_smoothgrad_samples"),
                                 ("occlusion", {"window": 8, "stride": 4}, "max_occlusion_evaluations")):  # 3 x 3 + 1
        with pytest.raises(CostCapExceededError) as caught:
            check_cost(explainers.create(method, model, **options), caps, (16, 16))
        assert caught.value.cap == cap
