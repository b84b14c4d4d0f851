"""Each model's rule model, built once and cached: traced when exact, else the fallback."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from ..outputs import logits_of
from .fallback import ModeRuleModel
from .tracing import optional_forward_arguments, trace_rule_model

RuleModel = Callable[..., object]


@dataclass(frozen=True)
class RulePath:
    """How a model's explained forward runs: ``traced`` (fast) or ``fallback``, and why."""

    kind: str
    reason: str


_cache_lock = threading.Lock()
_rule_models: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], RuleModel, RulePath]] = (
    weakref.WeakKeyDictionary()
)
# The same with layer sites (relevance methods), built only once such a method explains the model.
_site_rule_models: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], RuleModel, RulePath]] = (
    weakref.WeakKeyDictionary()
)


def _structure_key(model: nn.Module) -> tuple[int, ...]:
    # Replacing a submodule after tracing changes this key, so a stale trace is never reused.
    return tuple(id(module) for module in model.modules())


def rule_model_for(model: nn.Module, example: torch.Tensor, layer_sites: bool = False) -> RuleModel:
    """The cached rule model of ``model`` (traced when possible, else the intercepting fallback).

    The first build checks the traced model against the model on ``example``: a trace whose output
    disagrees (Python control flow fx froze) or that would lose a custom ``autograd.Function``
    backward is discarded for the fallback. Either returns what the model returns (use
    :func:`explainers.logits_of` on it). ``layer_sites``: the variant whose convolution, linear,
    batch-norm and activation calls end in layer sites (``layer_sites.py``), cached apart.

    Raises:
        UnsupportedModelError: the forward needs arguments besides the image.
    """
    key = _structure_key(model)
    cache = _site_rule_models if layer_sites else _rule_models
    with _cache_lock:
        cached = cache.get(model)
        if cached is not None and cached[0] == key:
            return cached[1]
        optional_forward_arguments(model)  # refuses a forward that needs more than the image
        rule_model, path = _build_rule_model(model, example, layer_sites)
        cache[model] = (key, rule_model, path)
        return rule_model


def rule_path(model: nn.Module, layer_sites: bool = False) -> RulePath | None:
    """How ``model``'s explained forward runs, once it has run (None before)."""
    cached = (_site_rule_models if layer_sites else _rule_models).get(model)
    return None if cached is None else cached[2]


def _uses_custom_autograd_functions(output: torch.Tensor) -> bool:
    """Whether the autograd graph behind ``output`` holds a Python ``autograd.Function``.

    fx traces through ``Function.apply`` into its forward and silently drops its custom backward,
    so a model using one must run its own forward (the fallback) to keep that backward.
    """
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _build_rule_model(model: nn.Module, example: torch.Tensor, layer_sites: bool = False) -> tuple[RuleModel, RulePath]:
    try:
        traced = trace_rule_model(model, layer_sites=layer_sites)
    except Exception as error:  # fx raises many types for untraceable code; the fallback is always exact
        return ModeRuleModel(model), RulePath("fallback", f"fx cannot trace it: {type(error).__name__}: {error}"[:300])
    with torch.enable_grad():
        expected = logits_of(model(example.detach().requires_grad_(True)))
    with torch.no_grad():
        observed = logits_of(traced(example))
    if _uses_custom_autograd_functions(expected):
        return ModeRuleModel(model), RulePath("fallback", "it uses a custom autograd.Function, whose backward a trace would drop")
    if expected.shape != observed.shape:
        return ModeRuleModel(model), RulePath("fallback", f"the trace returns {list(observed.shape)}, the model {list(expected.shape)}")
    # Float rounding differs between the trace and the model (batch norms run as their affine map):
    # the tolerance scales with the logits, so large logits do not send an exact trace to the fallback.
    difference = float((expected.detach() - observed).abs().max())
    tolerance = 1e-4 * float(expected.detach().abs().max()) + 1e-5
    if not difference <= tolerance:
        return ModeRuleModel(model), RulePath(
            "fallback", f"the trace disagrees with the model by {difference:.3g} (Python control flow fx froze?)")
    return traced, RulePath("traced", "fx traced it and the trace matches the model")


def uses_traced_rules(model: nn.Module) -> bool:
    """Whether ``model``'s cached rule model is the fast traced one (for diagnostics and tests)."""
    path = rule_path(model)
    return path is not None and path.kind == "traced"
