"""The serving layer without a server: request forms, routes, per-request errors, caps."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import explainers
from explainers import registry
from serving.requests import RawRequest
from serving.service import ExplanationService
from serving.settings import ServingSettings
from support.models import ModuleReluNet, seeded
from support.replies import without_timing

CLASSES = ["circle", "square", "triangle", "cross"]


def png_bytes(size=(20, 24), seed=0, mode="RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def settings(**overrides) -> ServingSettings:
    section = {"input_size": [16, 16], "class_names": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3,
               "default_explainers": ["guided_backprop", "grad_cam"], "top_k": 2, **overrides}
    return ServingSettings.from_mapping(section)


@pytest.fixture
def model():
    return seeded(ModuleReluNet(classes=4))


@pytest.fixture
def service(model):
    return ExplanationService(model, settings())


def raw(body, headers=None, explain_route=False, field="body"):
    return RawRequest({field: body}, headers or {}, explain_route)


def json_request(**fields):
    fields.setdefault("image", base64.b64encode(png_bytes()).decode())
    return raw(fields)


def decode_png(entry) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(entry["data"])))


def test_plain_request_gets_predictions_only(service, model):
    reply = service.handle([raw(png_bytes())])[0]
    assert reply.status == 200 and set(reply.body) == {"predictions"}
    predictions = reply.body["predictions"]
    assert len(predictions) == 2 and predictions[0]["score"] >= predictions[1]["score"]
    assert predictions[0]["label"] == CLASSES[predictions[0]["index"]]


def test_prediction_equals_the_model_on_the_same_preprocessing(service, model):
    image = Image.open(io.BytesIO(png_bytes())).convert("RGB").resize((16, 16), Image.BILINEAR)
    x = (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None] - 0.5) / 0.25
    with torch.no_grad():
        probabilities = torch.softmax(model(x), 1)[0]
    top = service.handle([raw(png_bytes())])[0].body["predictions"][0]
    assert top["index"] == int(probabilities.argmax())
    assert top["score"] == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_every_request_form_and_opt_in(service):
    image = png_bytes()
    forms = {
        "header": raw(image, {"X-Explain": "saliency, deconvnet"}),
        "header lower case": raw(image, {"x-explain": "saliency,deconvnet"}),
        "multipart": raw(image, {"X-Explain": "saliency,deconvnet"}, field="data"),
        "json": json_request(explain=["saliency", "deconvnet"]),
        "json as bytes": raw(json.dumps({"image": base64.b64encode(image).decode(), "explain": "saliency,deconvnet"}).encode()),
    }
    replies = service.handle(list(forms.values()))
    for name, reply in zip(forms, replies):
        assert reply.status == 200, (name, reply.body)
        assert set(reply.body["explanations"]) == {"saliency", "deconvnet"}, name
        assert decode_png(reply.body["explanations"]["saliency"]).size == (16, 16)
    first = replies[0].body["explanations"]["saliency"]["data"]
    assert all(r.body["explanations"]["saliency"]["data"] == first for r in replies)


def test_explain_route_uses_the_default_explainers(service):
    reply = service.handle([raw(png_bytes(), explain_route=True)])[0]
    assert set(reply.body["explanations"]) == {"guided_backprop", "grad_cam"}
    assert reply.route == "explain"


def test_target_by_index_and_label_and_top_k(service):
    by_label, by_index, top2 = service.handle([
        json_request(explain=["saliency"], target="triangle"),
        json_request(explain=["saliency"], target=2),
        json_request(explain=["saliency"], explain_top_k=2, top_k=3)])
    assert by_label.body["explanations"]["saliency"]["target"] == {"index": 2, "label": "triangle"}
    assert without_timing(by_label.body["explanations"]) == without_timing(by_index.body["explanations"])
    entries = top2.body["explanations"]["saliency"]
    ranked = [p["index"] for p in top2.body["predictions"]]
    assert len(top2.body["predictions"]) == 3
    assert [e["target"]["index"] for e in entries] == ranked[:2]


def test_each_encoding(service):
    replies = service.handle([json_request(explain=["saliency"], encoding=encoding)
                              for encoding in ("png", "overlay", "npy-f16")])
    png, overlay, npy = (r.body["explanations"]["saliency"] for r in replies)
    assert decode_png(png).size == (16, 16)
    assert decode_png(overlay).mode == "RGB"
    array = np.load(io.BytesIO(base64.b64decode(npy["data"])))
    assert array.dtype == np.float16 and array.shape == (3, 16, 16)
    small = ExplanationService(service.model, settings(input_size=[16, 16]))
    as_json = small.handle([json_request(explain=["grad_cam"], encoding="json")])[0]
    assert np.array(as_json.body["explanations"]["grad_cam"]["data"]).shape == (16, 16)


def test_errors_are_per_request_and_typed(service):
    good = raw(png_bytes())
    cases = {
        "empty": (raw(b""), 400, "invalid_request"),
        "not an image": (raw(b"\x00garbage" * 10), 400, "invalid_image"),
        "malformed json": (raw(b'{"image": '), 400, "invalid_request"),
        "no image": (raw({"explain": ["saliency"]}), 400, "invalid_request"),
        "bad base64": (raw({"image": "@@@"}), 400, "invalid_request"),
        "unknown explainer": (json_request(explain=["lime"]), 400, "unknown_explainer"),
        "unknown label": (json_request(explain=["saliency"], target="hexagon"), 400, "invalid_target"),
        "target out of range": (json_request(explain=["saliency"], target=4), 400, "invalid_target"),
        "too many explainers": (json_request(explain=["saliency", "deconvnet", "grad_cam", "guided_backprop"]), 422, "cost_cap_exceeded"),
        "ig steps over cap": (json_request(explain=["integrated_gradients"], options={"integrated_gradients": {"n_steps": 10_000_000}}), 422, "cost_cap_exceeded"),
        "bad option": (json_request(explain=["integrated_gradients"], options={"integrated_gradients": {"n_steps": -1}}), 400, "invalid_option"),
        "unknown encoding": (json_request(explain=["saliency"], encoding="gif"), 400, "invalid_option"),
        "unknown field": (json_request(explain=["saliency"], colour="red"), 400, "invalid_request"),
    }
    requests = [good] + [case[0] for case in cases.values()] + [good]
    replies = service.handle(requests)
    assert replies[0].status == 200 and replies[-1].status == 200
    for (name, (_, status, code)), reply in zip(cases.items(), replies[1:-1]):
        assert (reply.status, reply.body["error"]["code"]) == (status, code), (name, reply.body)
        assert reply.body["error"]["message"]


def test_failed_explanation_still_returns_the_prediction(model, monkeypatch):
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))

    @explainers.register("always_fails")
    class AlwaysFails(explainers.Explainer):
        def attribute(self, inputs, targets):
            raise RuntimeError("boom")

    service = ExplanationService(model, settings())
    reply = service.handle([json_request(explain=["saliency", "always_fails"])])[0]
    assert reply.status == 200
    assert set(reply.body["explanations"]) == {"saliency"}
    assert reply.body["explanation_errors"]["always_fails"]["code"] == "explanation_failed"
    assert "boom" in reply.body["explanation_errors"]["always_fails"]["message"]
    assert reply.body["predictions"]


def test_allow_list_and_coarse_output(model):
    service = ExplanationService(model, settings(allowed_explainers=["grad_cam", "guided_backprop"], caps={"coarse_output": 4}))
    denied, coarse = service.handle([json_request(explain=["saliency"]),
                                     json_request(explain=["guided_backprop"], render={"coarse_size": 8})])
    assert (denied.status, denied.body["error"]["code"]) == (403, "explainer_not_allowed")
    entry = coarse.body["explanations"]["guided_backprop"]
    assert entry["shape"] == [4, 4] or len(np.unique(np.asarray(decode_png(entry)))) <= 16


def test_plain_requests_share_one_forward_and_pay_no_backward(model):
    service = ExplanationService(model, settings())
    forwards, backwards = [], []
    first = model.features[0]
    handles = [first.register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0])),
               first.register_full_backward_hook(lambda *a: backwards.append(1))]
    try:
        replies = service.handle([raw(png_bytes(seed=s)) for s in range(3)] + [json_request(explain=["saliency"])])
    finally:
        for handle in handles:
            handle.remove()
    assert all(r.status == 200 for r in replies)
    # The first explanation of a model also checks its trace once (two forwards of one row).
    assert forwards[0] == 3 and forwards[-1] == 1
    assert len(backwards) <= 1


def test_bad_settings_fail_the_load():
    for bad in ({"input_size": [16]}, {"class_names": []}, {"default_explainers": ["lime"]},
                {"top_k": 9}, {"caps": {"max_image_pixels": 0}}, {"caps": {"bogus": 1}}, {"bogus": 1},
                {"allowed_explainers": ["saliency"]}):
        with pytest.raises(explainers.PluginError):
            ServingSettings.from_mapping({"input_size": [16, 16], "class_names": CLASSES, **bad})


def test_a_class_name_file_holding_one_string_is_rejected(tmp_path):
    (tmp_path / "names.json").write_text('"cat"')
    with pytest.raises(explainers.InvalidOptionError):
        ServingSettings.from_mapping({"input_size": [16, 16], "class_names": "names.json"}, tmp_path)


def test_an_explanation_says_what_it_did(service):
    (reply,) = service.handle([json_request(explain=["guided_backprop", "grad_cam", "saliency"])])
    explanations = reply.body["explanations"]
    assert explanations["guided_backprop"]["rule_sites"] == {"relu": 4}  # ModuleReluNet: four nn.ReLU calls
    assert "rule_sites" not in explanations["saliency"]  # the plain gradient applies no rule
    assert explanations["grad_cam"]["layer"] == "head.0" and "layer" not in explanations["saliency"]
    assert all(entry["latency_ms"] >= 0 for entry in explanations.values())
