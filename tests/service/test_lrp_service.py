"""LRP through the request service: signed maps rendered with both polarities, a model LRP has no
rule for answered with a typed unsupported_model error (HTTP 422 for the explainer) naming the
operation, and reported unavailable by the archive-time sanity checks rather than failing them."""

import base64
import io

import numpy as np
import torch
from PIL import Image
from torch import nn

import explainers
from serving.replies import as_plugin_error
from serving.requests import RawRequest
from serving.sanity import SanitySettings, measure
from serving.service import ExplanationService
from serving.settings import ServingSettings
from support.models import ModuleReluNet, seeded

CLASSES = ["circle", "square", "triangle", "cross"]


class GatedNet(nn.Module):
    """A convolution with a squeeze-excitation gate: a product of two input-dependent tensors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = h * torch.sigmoid(self.gate(h.mean(dim=(2, 3)))).view(-1, 4, 1, 1)
        return self.fc(h.mean(dim=(2, 3)))


def _settings(**overrides) -> ServingSettings:
    return ServingSettings.from_mapping({"input_size": [16, 16], "class_names": CLASSES, "mean": [0.5] * 3,
                                         "std": [0.25] * 3, "top_k": 2, **overrides})


def _request(**fields) -> RawRequest:
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return RawRequest({"body": {"image": base64.b64encode(buffer.getvalue()).decode(), **fields}}, {}, False)


def test_lrp_maps_are_signed_and_rendered_with_both_polarities():
    model = seeded(ModuleReluNet(classes=4))
    service = ExplanationService(model, _settings())
    as_json, as_png = service.handle([
        _request(explain=["lrp"], encoding="json", render={"polarity": "both", "reduce": "sum"}),
        _request(explain=["lrp"], options={"lrp": {"composite": "epsilon"}}, render={"polarity": "both"})])
    assert as_json.status == 200 and as_png.status == 200, (as_json.body, as_png.body)
    signed = np.array(as_json.body["explanations"]["lrp"]["data"])
    assert signed.shape == (16, 16) and signed.min() < 0 < signed.max()
    entry = as_json.body["explanations"]["lrp"]
    assert entry["rule_sites"] and entry["rule_sites"].get("epsilon", 0) >= 1
    png = Image.open(io.BytesIO(base64.b64decode(as_png.body["explanations"]["lrp"]["data"])))
    assert png.size == (16, 16) and len(np.unique(np.asarray(png))) > 2


def test_a_model_without_a_rule_gets_a_typed_error_naming_the_operation_and_its_prediction():
    service = ExplanationService(seeded(GatedNet()).eval(), _settings())
    reply = service.handle([_request(explain=["lrp", "saliency"])])[0]
    assert reply.status == 200 and reply.body["predictions"] and "saliency" in reply.body["explanations"]
    error = reply.body["explanation_errors"]["lrp"]
    assert error["code"] == "unsupported_model" and error["operation"] == "sigmoid"
    assert "squeeze-excitation" in error["message"]
    # The same refusal from the library, as the serving layer maps it: 422.
    try:
        explainers.create("lrp", GatedNet().eval()).explain(torch.randn(1, 3, 16, 16))
    except Exception as raised:  # noqa: BLE001 - checked below
        assert as_plugin_error(raised).http_status == 422
    else:
        raise AssertionError("lrp explained a gated model")


def test_archive_time_checks_report_lrp_unavailable_instead_of_failing():
    inputs = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    settings = SanitySettings(randomisation_steps=1, deletion_steps=2)
    report, _ = measure(seeded(GatedNet()).eval(), ["saliency", "lrp"], {}, inputs, settings)
    described = report.describe()
    assert report.explainers["saliency"].scores is not None
    assert described["unavailable_explainers"] == ["lrp"]
    assert described["explainers"]["lrp"]["available"] is False
    assert described["explainers"]["lrp"]["error"]["operation"] == "sigmoid"
    supported, _ = measure(seeded(ModuleReluNet(classes=4)), ["lrp"], {}, inputs, settings)
    assert supported.explainers["lrp"].scores is not None and supported.describe()["unavailable_explainers"] == []


def test_the_service_passes_the_pixel_range_under_the_models_normalisation_as_box_bounds():
    service = ExplanationService(seeded(ModuleReluNet(classes=4)), _settings())
    # mean 0.5, std 0.25: pixels 0 and 1 are -2 and 2 in model-input space.
    assert service._pixel_bounds("lrp") == {"low": [-2.0] * 3, "high": [2.0] * 3}
    assert service._pixel_bounds("saliency") == {} and service._pixel_bounds("no_such_method") == {}
    explainers_built = service._explainers(type("Request", (), {
        "explainers": ["lrp"], "method_options": {"lrp": {"composite": "epsilon_gamma_box", "high": 1.5}}})())
    assert explainers_built[0].low.tolist() == [-2.0] * 3 and explainers_built[0].high.tolist() == [1.5]
    reply = service.handle([_request(explain=["lrp"], options={"lrp": {"composite": "epsilon_gamma_box"}})])[0]
    assert reply.status == 200 and reply.body["explanations"]["lrp"]["rule_sites"].get("box") == 1, reply.body
