"""The explainer layer: predictions with explanations for image classifiers.

The library: it imports torch and Captum and nothing else of this project; serving, TorchServe
and tools build on it. See DESIGN.md section 1 for the contract.
"""

from . import methods  # noqa: F401  (registers the built-in explainers)
from .api import predict_and_explain
from .base import Cost, Explainer, GradientRuleExplainer
from .errors import (
    InvalidInputError,
    InvalidOptionError,
    InvalidTargetError,
    PluginError,
    UnknownExplainerError,
)
from .explanation import Explanation
from .outputs import logits_of
from .registry import available, create, register

__all__ = [
    "Cost",
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
    "logits_of",
    "predict_and_explain",
    "register",
]
