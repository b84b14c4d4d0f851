"""The explainer layer: predictions with explanations for image classifiers.

Knows nothing of TorchServe. See DESIGN.md section 1 for the contract.
"""

from . import cam, captum_methods, gradient_methods  # noqa: F401  (registers the built-in explainers)
from .api import predict_and_explain
from .base import Explainer, GradientRuleExplainer
from .errors import (
    InvalidInputError,
    InvalidOptionError,
    InvalidTargetError,
    PluginError,
    UnknownExplainerError,
)
from .explanation import Explanation
from .registry import available, create, register

__all__ = [
    "Explainer",
    "Explanation",
    "GradientRuleExplainer",
    "InvalidInputError",
    "InvalidOptionError",
    "InvalidTargetError",
    "PluginError",
    "UnknownExplainerError",
    "available",
    "create",
    "predict_and_explain",
    "register",
]
