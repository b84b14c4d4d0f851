"""Property: whatever a client sends, the request decoder answers with a client error or a request.

The decoder is the service's prepare path (``parse_request``, the explainer and rendering checks,
``decode_image``, the model input) plus building the requested explainers with the request's
options and checking them against the cost caps. Nothing the client controls may make it raise
anything but a ``PluginError`` with a 4xx status. Run longer with e.g.
``XAI_FUZZ_EXAMPLES=20000 pytest tests/test_request_fuzz.py``.
"""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import explainers
from explainers.errors import PluginError
from serving.rendering.options import RenderOptions
from serving.requests import JSON_FIELDS, RawRequest
from serving.service import ExplanationService
from serving.settings import ServingSettings
from support.models import ModuleReluNet, seeded

FUZZ_EXAMPLES = int(os.environ.get("XAI_FUZZ_EXAMPLES", "200"))
CLASSES = ["circle", "square", "triangle", "cross"]

fuzz_settings = settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


def _png(size=(12, 10), mode="RGB") -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


SEED_IMAGES = [_png(), _png((3, 3), "L"), _png((40, 2), "RGBA"), _png((9, 9), "P")]
SERVICE = ExplanationService(
    seeded(ModuleReluNet(classes=4)),
    ServingSettings.from_mapping({
        "input_size": [16, 16], "class_names": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3,
        "caps": {"max_image_pixels": 250_000, "max_explainers_per_request": 3, "coarse_output": None},
    }),
)

# -- strategies ----------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
names = st.sampled_from(explainers.available() + ["", "lime", "SALIENCY", " saliency", "grad_cam,saliency"])
option_names = st.sampled_from(
    ["n_steps", "internal_batch_size", "baseline", "method", "samples", "noise", "batch_size", "window",
     "stride", "perturbations_per_eval", "layer", "layers", "combine", "max_channels", "reshape", "bogus"])
option_values = st.one_of(
    st.integers(min_value=-3, max_value=2_000), st.sampled_from([0, 10**9, 10**30, -1, True, None]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), json_values,
)
render_names = st.sampled_from(list(RenderOptions.option_names()) + ["bogus"])
render_values = st.one_of(
    st.sampled_from(["png", "overlay", "npy-f16", "json", "both", "positive", "inferno", "coolwarm", "none", "l2"]),
    st.integers(min_value=-2, max_value=10**6), st.floats(allow_nan=True), st.lists(st.floats(), max_size=3),
    json_values,
)
images = st.one_of(
    st.sampled_from(SEED_IMAGES).map(lambda data: base64.b64encode(data).decode()),
    st.sampled_from(SEED_IMAGES).map(lambda data: "data:image/png;base64," + base64.b64encode(data).decode()),
    st.binary(max_size=64).map(lambda data: base64.b64encode(data).decode()),
    st.text(max_size=40), json_values,
)
field_values = {
    "image": images,
    "explain": st.one_of(st.lists(names, max_size=5), names, json_values),
    "target": st.one_of(st.integers(-5, 10), st.sampled_from(CLASSES + ["hexagon", "3", " 2 ", "²", "9" * 40]),
                        st.floats(allow_nan=True), json_values),
    "encoding": st.one_of(st.sampled_from(["png", "overlay", "npy-f16", "json", "jpeg", ""]), json_values),
    "top_k": st.one_of(st.integers(-2, 20), st.sampled_from(["2", "٣", "1" * 5000]), json_values),
    "explain_top_k": st.one_of(st.integers(-2, 20), json_values),
    "options": st.one_of(st.dictionaries(names, st.dictionaries(option_names, option_values, max_size=3), max_size=3),
                         json_values),
    "render": st.one_of(st.dictionaries(render_names, render_values, max_size=3), json_values),
    "quality": st.one_of(st.booleans(), st.sampled_from(["true", "false", "yes"]),
                         st.dictionaries(st.sampled_from(["steps", "bogus"]), option_values, max_size=2), json_values),
}


@st.composite
def documents(draw) -> dict:
    keys = draw(st.lists(st.sampled_from(sorted(JSON_FIELDS)), unique=True, max_size=len(JSON_FIELDS)))
    document = {key: draw(field_values[key]) for key in keys}
    if draw(st.integers(0, 9)) == 0:
        document[draw(st.text(max_size=6))] = draw(json_values)
    return document


def _serialised(document: object, draw) -> bytes:
    text = json.dumps(document, allow_nan=True)
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]  # truncated JSON
    return text.encode()


@st.composite
def bodies(draw):
    kind = draw(st.sampled_from(["dict", "json-bytes", "json-text", "raw-image", "bytes", "text", "value", "deep"]))
    if kind == "dict":  # TorchServe parsed an application/json body already
        return draw(documents())
    if kind == "json-bytes":
        return _serialised(draw(st.one_of(documents(), json_values)), draw)
    if kind == "json-text":  # a text/* body arrives decoded
        return _serialised(draw(st.one_of(documents(), json_values)), draw).decode()
    if kind == "raw-image":
        data = bytearray(draw(st.sampled_from(SEED_IMAGES)))
        for _ in range(draw(st.integers(0, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    if kind == "text":
        return draw(st.text(max_size=64))
    if kind == "deep":
        depth = draw(st.integers(500, 200_000))
        return ("[" * depth if draw(st.booleans()) else '{"image":' + "[" * depth).encode()
    return draw(json_values)  # any JSON value TorchServe may have parsed


headers = st.dictionaries(
    st.sampled_from(["X-Explain", "x-explain", "Content-Type", "explain", "Accept", "X-Other"]),
    st.one_of(st.text(max_size=40), names, st.sampled_from(["application/x-www-form-urlencoded", "image/png"]),
              st.binary(max_size=20)),
    max_size=3,
)


@st.composite
def raw_requests(draw) -> RawRequest:
    body = draw(bodies())
    form = draw(st.sampled_from(["body", "data", "form", "none"]))
    if form == "form":  # multipart: "data" plus text fields, as bytes
        extra = draw(st.dictionaries(st.sampled_from(sorted(JSON_FIELDS) + ["file"]),
                                     st.one_of(st.binary(max_size=30), st.text(max_size=30)), max_size=3))
        fields = {**extra, "data": body}
    elif form == "none":  # form-urlencoded bytes split into meaningless fields, or nothing at all
        fields = draw(st.dictionaries(st.text(max_size=10), st.binary(max_size=20), max_size=3))
        fields.pop("data", None), fields.pop("body", None)
    else:
        fields = {form: body}
    return RawRequest(fields=fields, headers=draw(headers), explain_route=draw(st.booleans()))


def _decode_or_client_error(raw: RawRequest) -> None:
    try:
        prepared = SERVICE._prepare(raw)
        if prepared.request.explainers:
            SERVICE._explainers(prepared.request)  # builds each explainer and checks the cost caps
    except PluginError as error:
        assert 400 <= error.http_status < 500, f"{type(error).__name__} {error.http_status}: {error}"
        assert error.message and len(error.message) < 2_000, error.message
        json.dumps(error.to_dict())  # the body the client gets is serialisable


# -- properties ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz_settings
@given(raw_requests())
def test_any_request_decodes_or_gets_a_client_error(raw):
    _decode_or_client_error(raw)


@fuzz_settings
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=6), headers)
def test_any_json_object_decodes_or_gets_a_client_error(document, request_headers):
    _decode_or_client_error(RawRequest({"body": document}, request_headers))


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=max(20, FUZZ_EXAMPLES // 5), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(documents())
def test_served_end_to_end_no_request_gets_a_5xx(document):
    """The whole service (model, explainers, encoding) on fuzzed JSON requests: no 5xx."""
    document.setdefault("image", base64.b64encode(SEED_IMAGES[0]).decode())
    (reply,) = SERVICE.handle([RawRequest({"body": document}, {})])
    assert reply.status < 500, reply.body
    if reply.status == 200:
        json.dumps(reply.body)
