"""predict_and_explain: one forward pass for the prediction and every gradient-rule method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .base import Explainer
from .errors import InvalidOptionError
from .explanation import Explanation
from .hygiene import explanation_mode
from .registry import create
from .run import ExplanationRun
from .validation import TargetSpec


def build_explainers(model: nn.Module, methods: Sequence[str | Explainer], options: Mapping) -> list[Explainer]:
    """Explainer instances for ``methods``, each with its own entry of ``options``.

    Raises:
        UnknownExplainerError: a name that is not registered.
        InvalidOptionError: a name twice, options for a method not requested, or a bad option.
    """
    if isinstance(methods, (str, bytes)) or not isinstance(methods, Sequence):
        raise InvalidOptionError(f"methods must be a list of explainer names, got {methods!r}")
    names = [method.name if isinstance(method, Explainer) else method for method in methods]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidOptionError(f"explainer(s) requested twice: {duplicates}")
    stray = sorted(set(options) - set(names))
    if stray:
        raise InvalidOptionError(f"options given for explainer(s) not requested: {stray}")
    explainers = []
    for method in methods:
        if isinstance(method, Explainer):
            explainers.append(method)
            continue
        method_options = options.get(method, {})
        if not isinstance(method_options, Mapping):
            raise InvalidOptionError(f"options for {method} must be a mapping, got {method_options!r}")
        explainers.append(create(method, model, **method_options))
    return explainers


def predict_and_explain(
    model: nn.Module,
    inputs: torch.Tensor,
    methods: Sequence[str | Explainer] = (),
    target: TargetSpec = None,
    **options: Mapping,
) -> tuple[torch.Tensor, dict[str, Explanation]]:
    """Logits of ``inputs`` and an explanation per method, from one forward pass of the model.

    Gradient-rule methods (saliency, input_x_gradient, guided_backprop, deconvnet, grad_cam,
    guided_grad_cam) share that forward and each pay one backward; the CAM family shares it too
    (its gradient CAMs share one backward to their layer, Eigen-CAM needs none, Score-CAM and
    Ablation-CAM add their own forwards); path and perturbation methods run after it, for the same
    targets.

    Args:
        model: an eager image classifier returning logits ``[B, classes]``.
        inputs: float tensor ``[B, C, H, W]``.
        methods: registry names (or explainer instances).
        target: None (each row's top-1), an int, a sequence of ints or a LongTensor ``[B]``.
        **options: per-method options, keyed by method name, e.g.
            ``integrated_gradients={"n_steps": 64}``.

    Raises:
        InvalidInputError, InvalidTargetError, UnknownExplainerError, InvalidOptionError.
    """
    explainers = build_explainers(model, methods, options)
    with explanation_mode(model):
        run = ExplanationRun(model, inputs, explainers, target)
        explanations = {explainer.name: run.explain(explainer) for explainer in explainers}
    return run.logits.detach(), explanations
