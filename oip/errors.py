"""The front server's two kinds of failure, and how each reaches a REST and a gRPC client.

- :class:`ClientError`: the request is wrong (a malformed tensor, an unknown explainer, a refused
  cost cap, a corrupt image). REST: its own 4xx status and ``{"error": "..."}``; gRPC:
  ``INVALID_ARGUMENT``.

Both are ``grpc_interceptor`` exceptions, which KServe's gRPC interceptor turns into their status
code; neither module imports kserve (whose protobuf messages clash with tritonclient's in one
process), so the pure parts of this package can be tested beside any client.
- :class:`UpstreamError`: TorchServe failed or cannot be reached. REST: TorchServe's 5xx (503 when
  it is unreachable); gRPC: ``UNAVAILABLE`` or ``INTERNAL``.
"""

from __future__ import annotations

from grpc import StatusCode
from grpc_interceptor.exceptions import GrpcException


class ClientError(GrpcException):
    """A request the client must change; ``status`` is the REST status (4xx)."""

    def __init__(self, reason: str, status: int = 400):
        if not 400 <= status < 500:
            raise ValueError(f"a client error has a 4xx status, got {status}")
        super().__init__(status_code=StatusCode.INVALID_ARGUMENT, details=reason)
        self.reason = reason
        self.status = status

    def __str__(self) -> str:
        return self.reason


class UpstreamError(GrpcException):
    """TorchServe answered 5xx, or not at all; ``status`` is the REST status (5xx)."""

    def __init__(self, reason: str, status: int = 503):
        code = StatusCode.UNAVAILABLE if status in (502, 503, 504) else StatusCode.INTERNAL
        super().__init__(status_code=code, details=reason)
        self.reason = reason
        self.status = status

    def __str__(self) -> str:
        return self.reason
