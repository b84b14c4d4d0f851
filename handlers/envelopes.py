"""KServe v1 / v2 request instances, as TorchServe's envelopes hand them to a handler.

With ``service_envelope=kserve`` (v1) TorchServe passes the handler the ``instances`` of one
request; with ``kservev2`` the ``inputs`` (a ``BYTES`` input's ``data`` already unwrapped to its
first element). Each becomes one :class:`RawRequest`; the envelope wraps the replies again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from explainers.errors import InvalidRequestError
from serving.requests import RawRequest

ENVELOPES = ("kserve", "kservev2")


def _v1_document(instance: object) -> dict:
    # Accepted instance forms: "<base64>", {"data": "<base64>"}, {"b64": "<base64>"}, or our JSON
    # request object {"image": "<base64>", "explain": [...], ...}.
    if isinstance(instance, str):
        return {"image": instance}
    if isinstance(instance, Mapping):
        if "image" in instance:
            return dict(instance)
        for key in ("data", "b64"):
            if isinstance(instance.get(key), str):
                rest = {k: v for k, v in instance.items() if k != key}
                return {"image": instance[key], **rest}
    raise InvalidRequestError(
        "a KServe v1 instance must be a base64 string or an object with \"data\", \"b64\" or \"image\"")


def _v2_document(tensor: object) -> dict:
    if isinstance(tensor, Mapping) and tensor.get("datatype") == "BYTES":
        data = tensor.get("data")
        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        if isinstance(data, str):
            stripped = data.lstrip()
            if stripped.startswith("{"):
                try:
                    document = json.loads(stripped)
                except ValueError:
                    raise InvalidRequestError("malformed JSON in a KServe v2 BYTES input") from None
                if isinstance(document, dict):
                    return document
            return {"image": data}
    raise InvalidRequestError(
        "a KServe v2 input must be a BYTES tensor holding the base64 image (or our JSON request object)")


def requests_from_instances(envelope: str, instances: Sequence[object], headers: Mapping[str, str],
                            explain_route: bool) -> list[RawRequest | InvalidRequestError]:
    """One request per instance, or the error that makes that instance unreadable."""
    to_document = _v1_document if envelope == "kserve" else _v2_document
    requests: list[RawRequest | InvalidRequestError] = []
    for instance in instances or []:
        try:
            requests.append(RawRequest({"body": to_document(instance)}, headers, explain_route))
        except InvalidRequestError as error:
            requests.append(error)
    return requests


def reply_bodies_for(envelope: str, bodies: Sequence[dict]) -> list:
    """What the handler returns under ``envelope``: v1 takes objects, v2 BYTES outputs take JSON text."""
    return list(bodies) if envelope == "kserve" else [json.dumps(body) for body in bodies]
