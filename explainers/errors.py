"""Every error the plugin raises on purpose, in one place.

Each class subclasses the builtin a caller would naturally catch (``ValueError``, ``KeyError``,
``MemoryError``...) and carries a stable machine-readable ``code`` plus the HTTP status a serving
layer should answer with, so the mapping to HTTP lives here and nowhere else.
"""

from __future__ import annotations


class PluginError(Exception):
    """Root of every error raised on purpose by this plugin."""

    code = "plugin_error"
    http_status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # KeyError's default __str__ would quote the message
        return self.message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


class InvalidInputError(PluginError, ValueError):
    """The input tensor or request payload has the wrong shape, dtype or content."""

    code = "invalid_input"
    http_status = 400


class ImageDecodeError(InvalidInputError):
    """The request's bytes are not an image Pillow can read."""

    code = "invalid_image"


class InvalidRequestError(InvalidInputError):
    """The request body is malformed (bad JSON, missing or mistyped field, bad base64)."""

    code = "invalid_request"


class InvalidTargetError(PluginError, ValueError):
    """The requested target class is of the wrong type or out of range."""

    code = "invalid_target"
    http_status = 400


class InvalidOptionError(PluginError, ValueError):
    """An explainer or rendering option is unknown, of the wrong type, or out of bounds."""

    code = "invalid_option"
    http_status = 400


class UnknownExplainerError(PluginError, KeyError):
    """No explainer is registered under the requested name."""

    code = "unknown_explainer"
    http_status = 400


class DuplicateExplainerError(PluginError, ValueError):
    """An explainer name was registered twice."""

    code = "duplicate_explainer"
    http_status = 500


class ExplainerNotAllowedError(PluginError, PermissionError):
    """The model's configuration does not let a request ask for this explainer."""

    code = "explainer_not_allowed"
    http_status = 403
    cap = "allowed_explainers"  # the model-config.yaml setting that refused it

    def to_dict(self) -> dict:
        return {**super().to_dict(), "cap": self.cap}


class ExplainerFailsSanityError(ExplainerNotAllowedError):
    """The model's ``sanity_policy: refuse`` turns away an explainer that failed a sanity check on
    this model. 403 as for any explainer the model's configuration does not allow: the request is
    well formed and the explainer could run, but its maps would not say what the client asks.
    A client catching ``explainer_not_allowed`` refusals catches this one too."""

    code = "explainer_fails_sanity"
    cap = "sanity_policy"

    def __init__(self, message: str, failed_checks: tuple[str, ...]):
        super().__init__(message)
        self.failed_checks = tuple(failed_checks)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "failed_checks": list(self.failed_checks)}


class CostCapExceededError(PluginError, ValueError):
    """A request asks for more work than the model's configured cost caps allow."""

    code = "cost_cap_exceeded"
    http_status = 422

    def __init__(self, message: str, cap: str):
        super().__init__(message)
        self.cap = cap

    def to_dict(self) -> dict:
        return {**super().to_dict(), "cap": self.cap}


class PayloadTooLargeError(CostCapExceededError):
    """The request's image is larger than the configured pixel cap."""

    code = "payload_too_large"
    http_status = 413


class UnsupportedModelError(PluginError, TypeError):
    """The model cannot be explained by this method (no activation for a rule, no feature map for
    Grad-CAM, no logits in its output): the request is well formed, the model cannot serve it."""

    code = "unsupported_model"
    http_status = 422


class ExplanationFailedError(PluginError, RuntimeError):
    """An explainer raised an unexpected error; wraps the cause for the response."""

    code = "explanation_failed"
    http_status = 500


class ResourceExhaustedError(PluginError, MemoryError):
    """An explanation ran out of memory."""

    code = "resource_exhausted"
    http_status = 503


class UnsupportedOperationError(UnsupportedModelError):
    """The model computes an operation the method has no rule for (LRP: a product of two tensors as
    in squeeze-excitation gates or attention, softmax, layer norm, ...). Same code and status as
    :class:`UnsupportedModelError`; ``operation`` names what was found."""

    def __init__(self, message: str, operation: str):
        super().__init__(message)
        self.operation = operation

    def to_dict(self) -> dict:
        return {**super().to_dict(), "operation": self.operation}
