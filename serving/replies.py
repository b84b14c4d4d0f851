"""A reply to one request, and the one place a failure becomes an HTTP status and an error body."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from explainers.errors import ExplanationFailedError, PluginError, ResourceExhaustedError

logger = logging.getLogger(__name__)

INTERNAL = "internal"  # the code of a failure that is our bug, not the client's


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict
    route: str = "predict"
    error_code: str | None = None  # set on every reply whose status is not 200


def as_plugin_error(error: BaseException) -> PluginError:
    """The typed error a caught exception is reported as."""
    if isinstance(error, PluginError):
        return error
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(error):
        return ResourceExhaustedError(f"out of memory: {error or type(error).__name__}")
    return ExplanationFailedError(f"{type(error).__name__}: {error}")


def error_entry(error: BaseException) -> dict:
    """The ``{"code", "message", ...}`` object a client gets for a request that failed with ``error``.

    An untyped exception is our bug: it is reported as ``internal`` with its type and message.
    (Inside ``explanation_errors`` it stays ``explanation_failed``: the prediction itself succeeded.)
    """
    failure = as_plugin_error(error)
    entry = failure.to_dict()
    if not isinstance(error, PluginError) and isinstance(failure, ExplanationFailedError):
        entry["code"] = INTERNAL
    return entry


def error_reply(error: BaseException, route: str) -> Reply:
    """The reply for a request that failed as a whole, with the status its error type maps to."""
    if not isinstance(error, PluginError):
        logger.error("unexpected error while serving a request", exc_info=error)
    entry = error_entry(error)
    return Reply(as_plugin_error(error).http_status, {"error": entry}, route, entry["code"])


def internal_error_reply(route: str = "predict") -> Reply:
    """For a failure outside any request's own handling (a bug in the batch code)."""
    entry = {"code": INTERNAL, "message": "internal error while handling the request"}
    return Reply(500, {"error": entry}, route, INTERNAL)
