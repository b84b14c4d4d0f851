"""Open Inference Protocol tensors <-> TorchServe's request document and reply (pure functions).

The specification is docs/explanations-as-tensors.md. In short:

- input: one ``BYTES`` tensor ``image`` of shape ``[N]`` (``[N, 1]`` accepted), each element an
  image file (PNG, JPEG, ...) as raw bytes (binary extension, gRPC) or as base64 text (JSON);
- request ``parameters``: ``explain`` (explainer names, comma-separated or a JSON list),
  ``target`` (class index or label), ``encoding`` (``fp16`` default, ``fp32``, ``png``),
  ``top_k``, ``polarity``, ``reduce``, ``coarse_size``, ``frame``, ``options`` (JSON object text);
- outputs: ``scores`` FP32 ``[N, K]`` (top-k probabilities), ``labels`` BYTES ``[N, K]``,
  ``indices`` INT64 ``[N, K]``, and per explainer ``explanation.<name>``: FP16 (or FP32)
  ``[1, H, W]`` attribution map, or BYTES ``[1]`` PNG, with what it shows in its parameters.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import ClientError

IMAGE_INPUT = "image"
ENCODINGS = ("fp16", "fp32", "png")
POLARITIES = ("positive", "negative", "both")
REDUCTIONS = ("max_abs", "sum", "l2")
DEFAULT_ENCODING, DEFAULT_POLARITY, DEFAULT_REDUCE = "fp16", "positive", "max_abs"
# Ours; anything else a client sends must be one of the protocol's own parameters.
REQUEST_PARAMETERS = frozenset({"explain", "target", "encoding", "top_k", "polarity", "reduce", "coarse_size",
                                "frame", "options"})
PROTOCOL_PARAMETERS = frozenset({"binary_data_output", "binary_data", "binary_data_size", "headers", "priority",
                                 "timeout", "sequence_id", "sequence_start", "sequence_end", "content_type"})
EXPLANATION_PREFIX = "explanation."


@dataclass(frozen=True)
class Forward:
    """What to ask TorchServe for one OIP request."""

    images: tuple[bytes, ...]
    explainers: tuple[str, ...] | None  # None: the request named none (the explain route uses the defaults)
    explain_route: bool
    encoding: str = DEFAULT_ENCODING
    polarity: str = DEFAULT_POLARITY
    reduce: str = DEFAULT_REDUCE
    fields: Mapping[str, object] = field(default_factory=dict)  # target, top_k, options

    @property
    def explains(self) -> bool:
        return self.explain_route or bool(self.explainers)

    def document(self, image: bytes) -> dict | None:
        """TorchServe's JSON request for one image; None when the raw image alone says it all."""
        if not self.explains and not self.fields:
            return None
        document: dict = {"image": base64.b64encode(image).decode("ascii"), **self.fields}
        if self.explainers is not None:
            document["explain"] = list(self.explainers)
        if self.explains:
            render = {"encoding": "png" if self.encoding == "png" else "npy-f16", "polarity": self.polarity,
                      "reduce": self.reduce}
            render.update(self.fields.get("render", {}))
            document["render"] = render
        return document


def parameters_dict(parameters: object) -> dict:
    """REST parameters as they are; gRPC ``InferParameter`` maps as plain values."""
    if not parameters:
        return {}
    plain = {}
    for key, value in dict(parameters).items():
        if hasattr(value, "HasField"):  # an InferParameter
            kind = value.WhichOneof("parameter_choice")
            value = getattr(value, kind) if kind else None
        plain[key] = value
    return plain


def image_elements(inputs: Sequence) -> tuple[bytes, ...]:
    """The images of the request's one ``image`` input."""
    if len(inputs) != 1 or inputs[0].name != IMAGE_INPUT:
        names = [tensor.name for tensor in inputs]
        raise ClientError(f"expected exactly one input named {IMAGE_INPUT!r} (BYTES, one image file per element), "
                          f"got {names}")
    tensor = inputs[0]
    if tensor.datatype != "BYTES":
        raise ClientError(f"input {IMAGE_INPUT!r} must have datatype BYTES (image file bytes), got {tensor.datatype}")
    shape = list(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise ClientError(f"input {IMAGE_INPUT!r} must have shape [N] or [N, 1], got {shape}")
    if tensor._raw_data is not None:
        elements = list(tensor.as_numpy().reshape(-1))
    else:
        elements = list(_flattened(tensor.data))
    if len(elements) != shape[0]:
        raise ClientError(f"input {IMAGE_INPUT!r} has shape {shape} but {len(elements)} elements")
    return tuple(_image_bytes(element, index) for index, element in enumerate(elements))


def _flattened(data) -> list:
    if isinstance(data, (str, bytes, bytearray)):
        return [data]
    if isinstance(data, np.ndarray):
        return list(data.reshape(-1))
    flat = []
    for item in data or []:
        flat.extend(_flattened(item) if isinstance(item, (list, tuple, np.ndarray)) else [item])
    return flat


def _image_bytes(element: object, index: int) -> bytes:
    """Raw file bytes, or base64 text of them. An image file is never valid base64 (its magic number
    has bytes outside the alphabet), so the two cannot be confused."""
    if isinstance(element, np.bytes_):
        element = bytes(element)
    if isinstance(element, str):
        element = element.encode("ascii", "replace")
    if not isinstance(element, (bytes, bytearray)) or not element:
        raise ClientError(f"element {index} of {IMAGE_INPUT!r} is empty or not bytes")
    try:
        return base64.b64decode(bytes(element), validate=True)
    except (binascii.Error, ValueError):
        return bytes(element)


def _choice(parameters: Mapping, name: str, choices: Sequence[str], default: str) -> str:
    value = parameters.get(name, default)
    if value not in choices:
        raise ClientError(f"parameter {name!r} must be one of {list(choices)}, got {value!r}")
    return value


def forward_for(inputs: Sequence, parameters: object, explain_route: bool) -> Forward:
    """Checks the request and says what to forward. Raises ClientError for a malformed one."""
    images = image_elements(inputs)
    parameters = parameters_dict(parameters)
    unknown = sorted(set(parameters) - REQUEST_PARAMETERS - PROTOCOL_PARAMETERS)
    if unknown:
        raise ClientError(f"unknown request parameter(s) {unknown}; ours: {sorted(REQUEST_PARAMETERS)}")
    explainers = None
    if "explain" in parameters:
        value = parameters["explain"]
        if isinstance(value, str):
            explainers = tuple(name.strip() for name in value.split(",") if name.strip())
        elif isinstance(value, list) and all(isinstance(name, str) for name in value):
            explainers = tuple(value)
        else:
            raise ClientError(f"parameter 'explain' must be explainer names (comma-separated text or a list), got {value!r}")
    fields: dict = {}
    if "target" in parameters:
        fields["target"] = parameters["target"]
    if "top_k" in parameters:
        fields["top_k"] = parameters["top_k"]
    if "options" in parameters:
        options = parameters["options"]
        if isinstance(options, str):
            try:
                options = json.loads(options)
            except ValueError:
                raise ClientError("parameter 'options' must be a JSON object (as text over gRPC)") from None
        if not isinstance(options, dict):
            raise ClientError(f"parameter 'options' must be a JSON object, got {options!r}")
        fields["options"] = options
    render = {name: parameters[name] for name in ("coarse_size", "frame") if name in parameters}
    if render:
        fields["render"] = render
    forward = Forward(images, explainers, explain_route, _choice(parameters, "encoding", ENCODINGS, DEFAULT_ENCODING),
                      _choice(parameters, "polarity", POLARITIES, DEFAULT_POLARITY),
                      _choice(parameters, "reduce", REDUCTIONS, DEFAULT_REDUCE), fields)
    if forward.explains and len(images) != 1:
        raise ClientError(f"explanations are for one image per request, got {len(images)}: send one request per "
                          "image (TorchServe batches concurrent requests)")
    return forward


# -- replies ----------------------------------------------------------------------------------


@dataclass
class Tensor:
    """One output: name, OIP datatype, numpy data (object arrays of bytes for BYTES), parameters."""

    name: str
    datatype: str
    data: np.ndarray
    parameters: dict = field(default_factory=dict)


def prediction_tensors(replies: Sequence[Mapping]) -> list[Tensor]:
    """``scores``, ``labels`` and ``indices`` ``[N, K]`` from TorchServe's ``predictions`` lists."""
    rows = [reply["predictions"] for reply in replies]
    width = min(len(row) for row in rows)
    rows = [row[:width] for row in rows]
    return [
        Tensor("scores", "FP32", np.array([[entry["score"] for entry in row] for row in rows], dtype=np.float32)),
        Tensor("labels", "BYTES", np.array([[str(entry["label"]).encode() for entry in row] for row in rows],
                                           dtype=np.object_)),
        Tensor("indices", "INT64", np.array([[entry["index"] for entry in row] for row in rows], dtype=np.int64)),
    ]


def reduce_channels(raw: np.ndarray, reduce: str, polarity: str) -> np.ndarray:
    """``[C, H, W]`` attributions -> one signed ``[H, W]`` map, in float32: positive ``R(max(a, 0))``,
    negative ``-R(max(-a, 0))``, both their sum, with ``R`` the channel max, sum or L2 norm
    (the rule of serving/rendering/encode.py, step 1, which the explanation's ``scale`` refers to)."""
    values = raw.astype(np.float32)
    reducer = {"max_abs": lambda parts: parts.max(axis=0), "sum": lambda parts: parts.sum(axis=0),
               "l2": lambda parts: np.sqrt((parts * parts).sum(axis=0))}[reduce]
    positive = lambda: reducer(np.maximum(values, 0))  # noqa: E731
    negative = lambda: reducer(np.maximum(-values, 0))  # noqa: E731
    reduced = positive() if polarity == "positive" else -negative() if polarity == "negative" else positive() - negative()
    return reduced + np.float32(0.0)  # no -0.0


def _json_text(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def explanation_tensor(name: str, entry: object, forward: Forward) -> Tensor:
    """``explanation.<name>`` from one TorchServe explanation entry (``npy-f16`` or ``png``)."""
    if isinstance(entry, list):  # several targets (explain_top_k): the first; the parameter is not ours
        entry = entry[0]
    data = base64.b64decode(entry["data"])
    if forward.encoding == "png":
        tensor = Tensor(EXPLANATION_PREFIX + name, "BYTES", np.array([data], dtype=np.object_))
    else:
        raw = np.load(io.BytesIO(data), allow_pickle=False)
        reduced = reduce_channels(raw, forward.reduce, forward.polarity)
        dtype = np.float16 if forward.encoding == "fp16" else np.float32
        tensor = Tensor(EXPLANATION_PREFIX + name, forward.encoding.upper(), reduced.astype(dtype)[None])
    target = entry.get("target", {})
    parameters = {"method": name, "encoding": forward.encoding, "target_index": int(target.get("index", -1)),
                  "target_label": str(target.get("label", "")), "scale": _json_text(entry.get("scale", {})),
                  "polarity": forward.polarity, "reduce": forward.reduce, "frame": entry.get("frame", "input")}
    for key in ("rule_sites", "sanity", "warnings"):
        if key in entry:
            parameters[key] = _json_text(entry[key])
    if "layer" in entry:
        parameters["layer"] = str(entry["layer"])
    tensor.parameters = parameters
    return tensor


def reply_tensors(replies: Sequence[Mapping], forward: Forward) -> tuple[list[Tensor], dict]:
    """Every output tensor of one OIP response, and the response's parameters."""
    tensors = prediction_tensors(replies)
    response_parameters = {}
    if forward.explains:
        (reply,) = replies
        for name, entry in reply.get("explanations", {}).items():
            tensors.append(explanation_tensor(name, entry, forward))
        if reply.get("explanation_errors"):
            response_parameters["explanation_errors"] = _json_text(reply["explanation_errors"])
    return tensors, response_parameters


def torchserve_error_text(status: int, body: bytes) -> str:
    """A one-line message from TorchServe's error body: ours (``{"error": {"code", "message"}}``)
    or its frontend's (``{"code", "type", "message"}``)."""
    try:
        document = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500] or f"HTTP {status}"
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict):
            text = f"{error.get('code', 'error')}: {error.get('message', '')}"
            if error.get("cap"):
                text += f" (cap {error['cap']})"
            return text
        if "message" in document:
            return f"{document.get('type', 'error')}: {document['message']}"
    return json.dumps(document)[:500]
