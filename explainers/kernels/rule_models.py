"""Each model's rule model, built once and cached: traced when exact, else the fallback."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch
import torch.fx
from torch import nn

from .fallback import ModeRuleModel
from .tracing import trace_rule_model

RuleModel = Callable[..., torch.Tensor]

_cache_lock = threading.Lock()
_rule_models: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], RuleModel]] = (
    weakref.WeakKeyDictionary()
)


def _structure_key(model: nn.Module) -> tuple[int, ...]:
    # Replacing a submodule after tracing changes this key, so a stale trace is never reused.
    return tuple(id(module) for module in model.modules())


def rule_model_for(model: nn.Module, example: torch.Tensor) -> RuleModel:
    """The cached rule model of ``model`` (traced when possible, else the intercepting fallback).

    The first build checks the traced model against the model on ``example``: a trace whose output
    disagrees (Python control flow fx froze) or that would lose a custom ``autograd.Function``
    backward is discarded for the fallback.
    """
    key = _structure_key(model)
    with _cache_lock:
        cached = _rule_models.get(model)
        if cached is not None and cached[0] == key:
            return cached[1]
        rule_model = _build_rule_model(model, example)
        _rule_models[model] = (key, rule_model)
        return rule_model


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


def _build_rule_model(model: nn.Module, example: torch.Tensor) -> RuleModel:
    try:
        traced = trace_rule_model(model)
    except Exception:  # fx raises many types for untraceable code; the fallback is always exact
        return ModeRuleModel(model)
    with torch.enable_grad():
        expected = model(example.detach().requires_grad_(True))
    with torch.no_grad():
        observed = traced(example)
    if (
        isinstance(expected, torch.Tensor)
        and isinstance(observed, torch.Tensor)
        and expected.shape == observed.shape
        and torch.allclose(expected.detach(), observed, rtol=1e-4, atol=1e-5)
        and not _uses_custom_autograd_functions(expected)
    ):
        return traced
    return ModeRuleModel(model)


def uses_traced_rules(model: nn.Module) -> bool:
    """Whether ``model``'s cached rule model is the fast traced one (for diagnostics and tests)."""
    cached = _rule_models.get(model)
    return cached is not None and isinstance(cached[1], torch.fx.GraphModule)
