"""The front server's two kinds of failure, and how each reaches a REST and a gRPC client.

- :class:`ClientError`: the request is wrong (a malformed tensor, an unknown explainer, a refused
  cost cap, a corrupt image). REST: its own 4xx status and ``{"error": "..."}``; gRPC:
  ``INVALID_ARGUMENT`` (KServe's interceptor maps ``InvalidInput`` so), or ``NOT_FOUND``.
- :class:`UpstreamError`: TorchServe failed or cannot be reached. REST: TorchServe's 5xx (503 when
  it is unreachable); gRPC: ``UNAVAILABLE`` or ``INTERNAL``.
"""

from __future__ import annotations

from grpc import StatusCode
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import InvalidInput


class ClientError(InvalidInput):
    """A request the client must change; ``status`` is the REST status (4xx)."""

    def __init__(self, reason: str, status: int = 400):
        if not 400 <= status < 500:
            raise ValueError(f"a client error has a 4xx status, got {status}")
        super().__init__(reason)
        self.status = status


class UpstreamError(GrpcException):
    """TorchServe answered 5xx, or not at all; ``status`` is the REST status (5xx)."""

    def __init__(self, reason: str, status: int = 503):
        code = StatusCode.UNAVAILABLE if status in (502, 503, 504) else StatusCode.INTERNAL
        super().__init__(status_code=code, details=reason)
        self.reason = reason
        self.status = status

    def __str__(self) -> str:
        return self.reason
