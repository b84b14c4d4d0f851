"""The front server's pure conversions (oip/tensors.py): OIP request -> TorchServe document,
TorchServe reply -> tensors. The end-to-end behaviour with real clients is tests/e2e/test_oip_front.py."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from oip.errors import ClientError, UpstreamError
from oip.tensors import (Forward, explanation_tensor, forward_for, prediction_tensors, reduce_channels,
                         torchserve_error_text)
from serving.rendering.encode import reduce_channels as serving_reduce_channels

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


@dataclass
class FakeInput:
    """What oip reads of KServe's InferInput."""

    name: str
    datatype: str
    shape: list
    data: object = None
    _raw_data: bytes | None = None

    def as_numpy(self):
        return np.array(self.data, dtype=np.object_)


def image_input(*elements, name="image", datatype="BYTES", shape=None):
    return FakeInput(name, datatype, shape or [len(elements)], list(elements))


def test_images_are_raw_bytes_or_base64_text_and_never_confused():
    forward = forward_for([image_input(PNG, base64.b64encode(PNG).decode(), base64.b64encode(PNG))], None, False)
    assert forward.images == (PNG, PNG, PNG)
    nested = FakeInput("image", "BYTES", [2, 1], [[PNG], [PNG]])
    assert forward_for([nested], {}, False).images == (PNG, PNG)


@pytest.mark.parametrize("inputs, words", [
    ([image_input(PNG, name="img")], "'image'"),
    ([image_input(PNG), image_input(PNG)], "exactly one input"),
    ([image_input(1.0, datatype="FP32")], "BYTES"),
    ([image_input(PNG, shape=[2])], "but 1 elements"),
    ([image_input(PNG, shape=[1, 2])], "shape"),
    ([image_input(b"")], "empty"),
])
def test_malformed_inputs_are_client_errors(inputs, words):
    with pytest.raises(ClientError) as raised:
        forward_for(inputs, None, False)
    assert raised.value.status == 400 and words in raised.value.reason


@pytest.mark.parametrize("parameters, words", [
    ({"explian": "grad_cam"}, "explian"),
    ({"encoding": "jpeg"}, "encoding"),
    ({"polarity": "up"}, "polarity"),
    ({"reduce": "mean"}, "reduce"),
    ({"explain": 3}, "explain"),
    ({"options": "{not json"}, "options"),
    ({"options": "[1]"}, "options"),
])
def test_malformed_parameters_are_client_errors(parameters, words):
    with pytest.raises(ClientError, match=words):
        forward_for([image_input(PNG)], parameters, False)


def test_explanations_are_for_one_image():
    with pytest.raises(ClientError, match="one image"):
        forward_for([image_input(PNG, PNG)], {"explain": "grad_cam"}, False)
    with pytest.raises(ClientError, match="one image"):
        forward_for([image_input(PNG, PNG)], None, True)  # the explain route
    assert len(forward_for([image_input(PNG, PNG)], None, False).images) == 2


def test_the_document_sent_to_torchserve():
    plain = forward_for([image_input(PNG)], {"binary_data_output": True}, False)
    assert plain.document(PNG) is None  # the raw image, no JSON
    asked = forward_for([image_input(PNG)], {"explain": "grad_cam, saliency", "target": "star", "top_k": 2,
                                             "options": json.dumps({"saliency": {"abs": True}}), "coarse_size": 8}, False)
    document = asked.document(PNG)
    assert base64.b64decode(document.pop("image")) == PNG
    assert document == {"explain": ["grad_cam", "saliency"], "target": "star", "top_k": 2,
                        "options": {"saliency": {"abs": True}},
                        "render": {"encoding": "npy-f16", "polarity": "positive", "reduce": "max_abs", "coarse_size": 8}}
    route = forward_for([image_input(PNG)], {"encoding": "png", "polarity": "both"}, True).document(PNG)
    assert "explain" not in route  # the model's default explainers
    assert route["render"] == {"encoding": "png", "polarity": "both", "reduce": "max_abs"}
    grpc_like = forward_for([image_input(PNG)], {"explain": ["grad_cam"]}, False)  # a JSON list over REST
    assert grpc_like.explainers == ("grad_cam",)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float16, st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6)),
              elements=st.floats(-1000, 1000, width=16)),
       st.sampled_from(["max_abs", "sum", "l2"]), st.sampled_from(["positive", "negative", "both"]))
def test_reduction_is_the_one_the_scale_refers_to(raw, reduce, polarity):
    """serving.rendering.encode.reduce_channels (torch) is the reference."""
    ours = reduce_channels(raw, reduce, polarity)
    reference = serving_reduce_channels(torch.from_numpy(raw.astype(np.float32)), reduce=reduce, polarity=polarity).numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
    assert not np.signbit(ours[ours == 0]).any()  # no -0.0


def npy_f16(values: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, values.astype(np.float16))
    return base64.b64encode(buffer.getvalue()).decode()


def test_an_explanation_entry_becomes_a_tensor_with_what_it_shows_in_its_parameters():
    raw = np.array([[[1.0, -2.0], [0.5, 0.0]], [[-3.0, 1.5], [0.25, 4.0]]], dtype=np.float32)  # [C=2, 2, 2]
    entry = {"encoding": "npy-f16", "shape": [2, 2, 2], "dtype": "float16", "data": npy_f16(raw),
             "scale": {"min": 0.0, "max": 3.9}, "target": {"index": 4, "label": "star"},
             "rule_sites": {"relu": 3}, "sanity": {"class_sensitive": True}, "latency_ms": 3.2}
    tensor = explanation_tensor("guided_backprop", entry, Forward((PNG,), ("guided_backprop",), False))
    assert tensor.name == "explanation.guided_backprop" and tensor.datatype == "FP16"
    np.testing.assert_array_equal(tensor.data, np.array([[[1.0, 1.5], [0.5, 4.0]]], dtype=np.float16))  # max of a+
    assert tensor.parameters == {"method": "guided_backprop", "encoding": "fp16", "target_index": 4,
                                 "target_label": "star", "scale": '{"max":3.9,"min":0.0}', "polarity": "positive",
                                 "reduce": "max_abs", "frame": "input", "rule_sites": '{"relu":3}',
                                 "sanity": '{"class_sensitive":true}'}
    negative = explanation_tensor("x", entry, Forward((PNG,), ("x",), False, encoding="fp32", polarity="negative", reduce="sum"))
    assert negative.datatype == "FP32"
    np.testing.assert_array_equal(negative.data, [[[-3.0, -2.0], [0.0, 0.0]]])
    png = explanation_tensor("x", {**entry, "encoding": "png", "data": base64.b64encode(PNG).decode()},
                             Forward((PNG,), ("x",), False, encoding="png"))
    assert png.datatype == "BYTES" and png.data.tolist() == [PNG]


def test_prediction_tensors_are_rows_in_order():
    replies = [{"predictions": [{"index": 1, "label": "square", "score": 0.9}, {"index": 0, "label": "circle", "score": 0.1}]},
               {"predictions": [{"index": 4, "label": "star", "score": 0.7}, {"index": 2, "label": "triangle", "score": 0.2}]}]
    scores, labels, indices = prediction_tensors(replies)
    assert scores.datatype == "FP32" and scores.data.dtype == np.float32 and scores.data.shape == (2, 2)
    np.testing.assert_array_equal(scores.data, np.array([[0.9, 0.1], [0.7, 0.2]], dtype=np.float32))
    assert labels.data.tolist() == [[b"square", b"circle"], [b"star", b"triangle"]]
    assert indices.data.dtype == np.int64 and indices.data.tolist() == [[1, 0], [4, 2]]


def test_torchserve_errors_become_one_line():
    ours = json.dumps({"error": {"code": "cost_cap_exceeded", "message": "too many", "cap": "max_occlusion_evaluations"}})
    assert torchserve_error_text(422, ours.encode()) == "cost_cap_exceeded: too many (cap max_occlusion_evaluations)"
    frontend = json.dumps({"code": 413, "type": "RequestEntityTooLarge", "message": "too big"})
    assert torchserve_error_text(413, frontend.encode()) == "RequestEntityTooLarge: too big"
    assert torchserve_error_text(503, b"") == "HTTP 503"
    with pytest.raises(ValueError):
        ClientError("x", 500)
    assert UpstreamError("down").status == 503 and str(UpstreamError("down")) == "down"
