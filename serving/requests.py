"""What one HTTP request asks for, parsed from any of the request forms the server accepts.

Forms: raw image bytes as the body; a multipart field ``data``; or a JSON object
``{"image": "<base64>", "explain": [...], "target": 3 | "circle", "encoding": "png", "top_k": 3,
"explain_top_k": 2, "options": {method: {...}}, "render": {...}, "quality": true | {"steps": 12}}``.
Explanations are asked for by the ``X-Explain: a,b`` header, the JSON ``explain`` field, or the
explanations route (which falls back to the model's default explainers).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from explainers.errors import CostCapExceededError, InvalidRequestError, InvalidTargetError
from .settings import ServingSettings

JSON_FIELDS = frozenset({"image", "explain", "target", "encoding", "top_k", "explain_top_k", "options", "render",
                         "quality"})
EXPLAIN_HEADER = "x-explain"
HOW_TO_SEND = ("send the image file as the body with its type (curl --data-binary @image.png -H "
               "'Content-Type: image/png'), as multipart field \"data\" (curl -F data=@image.png), or as "
               "JSON {\"image\": \"<base64>\"} with Content-Type: application/json")
PREVIEW_CHARS = 80  # client values echoed in error messages are cut to this length


@dataclass(frozen=True)
class RawRequest:
    """One request as the server hands it over, before any interpretation."""

    fields: Mapping[str, object]  # TorchServe's per-request dict: "body" or "data", plus form fields
    headers: Mapping[str, str] = field(default_factory=dict)
    explain_route: bool = False


@dataclass(frozen=True)
class ExplainRequest:
    image_bytes: bytes
    explainers: tuple[str, ...]
    target: int | None
    top_k: int
    explain_top_k: int = 1
    method_options: Mapping[str, Mapping] = field(default_factory=dict)
    render_overrides: Mapping[str, object] = field(default_factory=dict)
    explain_route: bool = False
    # Deletion steps of the quality score each explanation gets; None: no score (the default).
    quality_steps: int | None = None

    @property
    def route(self) -> str:
        return "explain" if self.explain_route or self.explainers else "predict"


def _preview(value: object) -> str:
    """``repr(value)``, cut short: error messages must not echo a whole request back."""
    text = repr(value)
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + f"... ({len(text)} chars)"


def _text(value: bytes | bytearray | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value


def _decimal(text: str) -> bool:
    """A short run of ASCII digits: ``str.isdigit`` also accepts '²', which ``int()`` rejects, and
    ``int()`` refuses strings of more than 4300 digits."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return _text(value)
    return None


def _json_body(body: object) -> Mapping | None:
    """The body as a JSON object, None for raw image bytes.

    Raises:
        InvalidRequestError: JSON that is malformed or not an object, or text that is not JSON.
    """
    if isinstance(body, Mapping):
        return body
    if isinstance(body, list):
        raise InvalidRequestError("JSON body must be an object with an \"image\" field, got an array")
    if isinstance(body, str):
        text = body
        if not text.lstrip().startswith(("{", "[")):
            raise InvalidRequestError(f"the body is text, neither an image nor a JSON object: {HOW_TO_SEND}")
    elif isinstance(body, (bytes, bytearray)):
        stripped = bytes(body).lstrip()
        if not stripped.startswith((b"{", b"[")):
            return None
        try:
            text = stripped.decode("utf-8")
        except UnicodeDecodeError:
            return None  # a binary image that happens to start with '{'
    else:
        raise InvalidRequestError(f"unsupported request body of type {type(body).__name__}: {HOW_TO_SEND}")
    try:
        parsed = json.loads(text)
    except ValueError as error:
        raise InvalidRequestError(f"malformed JSON body: {error}") from None
    except RecursionError:
        raise InvalidRequestError("malformed JSON body: nested too deeply") from None
    if not isinstance(parsed, Mapping):
        raise InvalidRequestError(f"JSON body must be an object with an \"image\" field, got {type(parsed).__name__}")
    return parsed


def _decode_base64_image(value: object) -> bytes:
    if not isinstance(value, str):
        raise InvalidRequestError(f"\"image\" must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:  # a data URL
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("\"image\" is not valid base64") from None


def _explainer_list(value: object, source: str) -> tuple[str, ...]:
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        names = [name.strip() for name in value.split(",") if name.strip()]
    elif isinstance(value, list) and all(isinstance(name, str) for name in value):
        names = [name.strip() for name in value]
    else:
        raise InvalidRequestError(
            f"{source} must be a list of explainer names or a comma-separated string, got {_preview(value)}")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)[:10]
    if duplicates:
        raise InvalidRequestError(f"explainer(s) requested twice: {duplicates}")
    return tuple(names)


def parse_target(value: object, settings: ServingSettings) -> int | None:
    """A class index from an index or a class label.

    Raises:
        InvalidTargetError: not an int or a known label, or an index out of range.
    """
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        if value in settings.class_names:
            return settings.class_names.index(value)
        if not _decimal(value.strip()):
            raise InvalidTargetError(f"unknown class label {_preview(value)}; labels: {list(settings.class_names)}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTargetError(f"target must be a class index or label, got {_preview(value)}")
    if not 0 <= value < settings.num_classes:
        raise InvalidTargetError(f"target class index {value} out of range [0, {settings.num_classes})")
    return value


def _count(value: object, name: str, maximum: int, cap: str, cap_value: int) -> int:
    """An integer in [1, maximum]; above ``cap_value`` (the model's cost cap) it names the cap."""
    if isinstance(value, (bytes, bytearray, str)) and _decimal(_text(value).strip()):
        value = int(_text(value))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise InvalidRequestError(f"{name} must be an integer in [1, {min(maximum, cap_value)}], got {_preview(value)}")
    if value > cap_value:
        raise CostCapExceededError(f"{name}={value} exceeds this model's cap of {cap_value}", cap=cap)
    return value


def parse_quality(value: object, settings: ServingSettings) -> int | None:
    """Deletion steps for the quality score: ``true`` (the model's ``quality_steps``), ``{"steps": n}``,
    or off (absent, ``false``; as a form field also the text ``true``/``false``).

    Raises:
        InvalidRequestError: any other value.
    """
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        value = {"true": True, "false": False}.get(value.strip().lower(), value)
    if value is None or value is False:
        return None
    if value is True:
        return settings.quality_steps
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"steps"})
        if unknown:
            raise InvalidRequestError(f"unknown \"quality\" field(s) {_preview(unknown[:10])}; allowed: ['steps']")
        steps = value.get("steps", settings.quality_steps)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InvalidRequestError(f"quality steps must be a positive integer, got {_preview(steps)}")
        return steps
    raise InvalidRequestError(f"\"quality\" must be true, false or {{\"steps\": n}}, got {_preview(value)}")


def _mapping(value: object, name: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"\"{name}\" must be a JSON object, got {_preview(value)}")
    return value


def _missing_image_message(raw: RawRequest) -> str:
    content_type = (_header(raw.headers, "content-type") or "").split(";")[0].strip().lower()
    if content_type == "application/x-www-form-urlencoded":
        # curl -d sends this by default; TorchServe then splits the bytes into form fields.
        return f"a form-urlencoded body (curl -d) cannot carry an image: {HOW_TO_SEND}"
    fields = sorted(str(key) for key in raw.fields if key not in ("data", "body"))
    if fields:
        return f"no image in the request (form fields {_preview(fields[:5])}, none named \"data\"): {HOW_TO_SEND}"
    return f"empty request: {HOW_TO_SEND}"


def parse_request(raw: RawRequest, settings: ServingSettings) -> ExplainRequest:
    """Interprets one request; checks form and types, not the image itself or the explainer caps.

    Raises:
        InvalidRequestError, InvalidTargetError: with a message naming the problem.
        CostCapExceededError: ``top_k`` or ``explain_top_k`` above the model's cap.
    """
    body = raw.fields.get("data")
    if body is None:
        body = raw.fields.get("body")
    if body is None or (isinstance(body, (bytes, bytearray, str)) and len(body) == 0):
        raise InvalidRequestError(_missing_image_message(raw))
    document = _json_body(body)
    if document is None:
        # Raw bytes or multipart: other form fields may carry the JSON fields as text.
        document = {key: value for key, value in raw.fields.items() if key not in ("data", "body")}
        document["image"] = None
        image_bytes = bytes(body)
    else:
        unknown = sorted(set(document) - JSON_FIELDS)
        if unknown:
            raise InvalidRequestError(f"unknown field(s) {_preview(unknown[:10])}; allowed: {sorted(JSON_FIELDS)}")
        if "image" not in document:
            raise InvalidRequestError("JSON body has no \"image\" field (base64 of the image file)")
        image_bytes = _decode_base64_image(document["image"])
        if not image_bytes:
            raise InvalidRequestError("\"image\" is empty")

    header = _header(raw.headers, EXPLAIN_HEADER)
    if "explain" in document:
        explainers = _explainer_list(document["explain"], "\"explain\"")
    elif header is not None:
        explainers = _explainer_list(header, "X-Explain header")
    elif raw.explain_route:
        explainers = settings.default_explainers
    else:
        explainers = ()

    render = dict(_mapping(document.get("render", {}), "render"))
    if "encoding" in document:
        render["encoding"] = document["encoding"]
    options = _mapping(document.get("options", {}), "options")
    for name, value in options.items():
        _mapping(value, f"options.{name}")
    caps = settings.caps
    return ExplainRequest(
        image_bytes=image_bytes,
        explainers=explainers,
        target=parse_target(document.get("target"), settings),
        top_k=_count(document.get("top_k", settings.top_k), "top_k", settings.num_classes, "max_top_k", caps.max_top_k),
        explain_top_k=_count(document.get("explain_top_k", 1), "explain_top_k", settings.num_classes,
                             "max_explained_classes", caps.max_explained_classes),
        method_options=options,
        render_overrides=render,
        explain_route=raw.explain_route,
        quality_steps=parse_quality(document.get("quality"), settings),
    )
