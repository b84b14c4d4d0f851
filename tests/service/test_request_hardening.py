"""Regression tests, without a server, for what the bad-input corpus and the fuzz test found."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from serving.requests import RawRequest
from serving.service import ExplanationService
from serving.settings import ServingSettings
from handlers.image_explainer import ImageExplainerHandler
from support.models import ModuleReluNet, seeded

CLASSES = ["circle", "square", "triangle", "cross"]


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE = base64.b64encode(png()).decode()


@pytest.fixture(scope="module")
def service():
    settings = ServingSettings.from_mapping({
        "input_size": [16, 16], "class_names": CLASSES, "top_k": 2,
        "allowed_explainers": ["saliency", "grad_cam", "integrated_gradients", "smoothgrad", "occlusion"],
        "default_explainers": ["grad_cam"],
        "caps": {"max_top_k": 3, "max_explained_classes": 2, "max_batch_per_forward": 16},
    })
    return ExplanationService(seeded(ModuleReluNet(classes=4)), settings)


def reply_to(service, body, headers=None, field="body"):
    (reply,) = service.handle([RawRequest({field: body}, headers or {})])
    return reply


def error_of(reply):
    assert reply.status != 200, reply.body
    return reply.status, reply.body["error"]["code"], reply.body["error"].get("cap")


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"image": ' + b"[" * 100_000, "[" * 100_000])
def test_deeply_nested_json_is_a_400(service, body):
    assert error_of(reply_to(service, body)) == (400, "invalid_request", None)


@pytest.mark.parametrize("field, value, code", [
    ("target", "\u00b2", "invalid_target"), ("target", "\u0663", "invalid_target"), ("target", "9" * 5000, "invalid_target"),
    ("top_k", "\u00b2", "invalid_request"), ("top_k", "1" * 5000, "invalid_request"), ("top_k", b"\xff\xfe", "invalid_request"),
])
def test_digit_strings_int_cannot_read_are_a_400(service, field, value, code):
    fields = {"data": png(), field: value}
    (reply,) = service.handle([RawRequest(fields, {}, False)])
    assert error_of(reply) == (400, code, None)


def test_form_urlencoded_and_text_bodies_say_how_to_send_the_image(service):
    form = service.handle([RawRequest({"image": b"abc"}, {"Content-Type": "application/x-www-form-urlencoded"})])[0]
    assert error_of(form)[:2] == (400, "invalid_request")
    assert "form-urlencoded" in form.body["error"]["message"] and "--data-binary" in form.body["error"]["message"]
    other_field = service.handle([RawRequest({"file": b"\x89PNG"}, {"Content-Type": "multipart/form-data"})])[0]
    assert "\"data\"" in other_field.body["error"]["message"]
    text = reply_to(service, "hello")
    assert error_of(text)[:2] == (400, "invalid_request") and "text" in text.body["error"]["message"]


def test_many_duplicate_explainer_names_are_refused_quickly(service):
    started = time.monotonic()
    reply = reply_to(service, {"image": IMAGE, "explain": [f"name{i % 50_000}" for i in range(100_000)]})
    assert error_of(reply) == (400, "invalid_request", None)
    assert time.monotonic() - started < 2.0
    assert len(reply.body["error"]["message"]) < 400


def test_error_messages_do_not_echo_the_request(service):
    for document in ({"image": IMAGE, "x" * 100_000: 1}, {"image": IMAGE, "explain": ["saliency"], "target": "y" * 100_000},
                     {"image": IMAGE, "render": "z" * 100_000}, {"image": IMAGE, "top_k": "w" * 100_000}):
        reply = reply_to(service, document)
        assert reply.status == 400 and len(reply.body["error"]["message"]) < 600


@pytest.mark.parametrize("options", [
    {"integrated_gradients": {"baseline": float("nan")}}, {"integrated_gradients": {"baseline": float("inf")}},
    {"occlusion": {"baseline": float("-inf")}},
])
def test_non_finite_option_values_are_invalid_options(service, options):
    reply = reply_to(service, {"image": IMAGE, "explain": list(options), "options": options})
    assert error_of(reply) == (400, "invalid_option", None)


@pytest.mark.parametrize("options, capped", [
    ({"occlusion": {"window": 8, "perturbations_per_eval": 17}}, True),
    ({"occlusion": {"window": 8, "perturbations_per_eval": 10**9}}, True),
    ({"integrated_gradients": {"n_steps": 32}}, True),  # all 32 steps in one forward
    ({"integrated_gradients": {"n_steps": 32, "internal_batch_size": 16}}, False),
    ({"integrated_gradients": {"n_steps": 8, "internal_batch_size": 10**6}}, False),  # one pass of 8 rows
    ({"smoothgrad": {"samples": 17}}, True),
    ({"smoothgrad": {"samples": 17, "batch_size": 8}}, False),
    ({"occlusion": {"window": 8, "perturbations_per_eval": 16}}, False),
])
def test_rows_per_forward_are_capped(service, options, capped):
    reply = reply_to(service, {"image": IMAGE, "explain": list(options), "options": options})
    if capped:
        assert error_of(reply) == (422, "cost_cap_exceeded", "max_batch_per_forward")
        option = {"integrated_gradients": "internal_batch_size", "smoothgrad": "batch_size",
                  "occlusion": "perturbations_per_eval"}[next(iter(options))]
        assert option in reply.body["error"]["message"]  # says which option to lower
    else:
        assert reply.status == 200 and "explanation_errors" not in reply.body, reply.body


def test_counts_over_their_cap_name_the_cap(service):
    assert error_of(reply_to(service, {"image": IMAGE, "top_k": 4})) == (422, "cost_cap_exceeded", "max_top_k")
    over = {"image": IMAGE, "explain": ["saliency"], "explain_top_k": 3}
    assert error_of(reply_to(service, over)) == (422, "cost_cap_exceeded", "max_explained_classes")
    assert error_of(reply_to(service, {"image": IMAGE, "top_k": 5})) == (400, "invalid_request", None)  # > classes


def test_an_explainer_outside_the_allow_list_names_the_setting(service):
    reply = reply_to(service, {"image": IMAGE, "explain": ["guided_backprop"]})
    assert error_of(reply) == (403, "explainer_not_allowed", "allowed_explainers")


class _Context:
    def __init__(self):
        self.statuses = {}

    def get_all_request_header(self, index):
        return {}

    def set_response_status(self, code, phrase, index):
        self.statuses[index] = (code, phrase)


def test_the_handler_answers_each_request_when_the_service_fails(service, monkeypatch):
    handler = ImageExplainerHandler()
    handler.service = service

    def broken(_requests):
        raise RuntimeError("a bug")

    monkeypatch.setattr(service, "handle", broken)
    context = _Context()
    bodies = handler.handle([{"body": png()}, {"body": png()}], context)
    assert bodies == [{"error": {"code": "internal", "message": "internal error while handling the request"}}] * 2
    assert context.statuses == {0: (500, "internal"), 1: (500, "internal")}
