"""Shared checks of the model battery: every method through ``predict_and_explain`` on a real
architecture, the model left as it was, rule sites as the explicit-rule reference counts them, and
equality with that reference."""

from __future__ import annotations

import fcntl
import json
import os
import traceback

import torch

import explainers
from support.reference_rules import ExplicitRuleMode, explicit_rule_attribution
from support.zoo import ModelFingerprint, noise_inputs

SHARED_FORWARD_METHODS = ("saliency", "input_x_gradient", "guided_backprop", "deconvnet", "grad_cam",
                          "guided_grad_cam")
RULE_METHODS = ("guided_backprop", "deconvnet", "guided_grad_cam")
# Grad-CAM maps have one channel; Guided Grad-CAM is guided backprop (three) weighted by it.
ONE_CHANNEL_METHODS = ("grad_cam",)
# Reference equality: the largest difference within this fraction of the reference's largest value.
REFERENCE_RTOL = 1e-4
# Guided backprop and DeconvNet must differ from the gradient by more than rounding.
DIFFERENT_BY = 1e-3

# model -> {"methods": {method: "ok" | error}, "sites": {...}, "reference": {...}}, written to the
# JSON file named by $XAI_MODEL_TABLE at the end of the session (the closing note's table); rows are
# merged into what the file holds, so start from a new file.
TABLE: dict[str, dict] = {}


def other_methods_options(size: int) -> dict:
    """Path and perturbation methods at their cheapest: two path steps, two noisy samples, one window."""
    return {
        "integrated_gradients": {"n_steps": 2},
        "smoothgrad": {"samples": 2},
        "occlusion": {"window": size, "stride": size, "perturbations_per_eval": 1},
    }


def reference_sites(model, inputs) -> dict[str, int]:
    """Activation call sites of one forward, per kind, as the reference sees them."""
    with torch.no_grad(), ExplicitRuleMode("saliency") as mode:
        model(inputs)
    return dict(mode.sites)


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().clamp(min=torch.finfo(expected.dtype).tiny)
    return float((actual - expected).abs().max() / scale)


def _describe(error: BaseException) -> str:
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__}: {str(error)[:300]} (at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})"


def explain_every_method(model, inputs, methods_options: dict) -> tuple[dict, dict]:
    """``(explanations, errors)`` by method name. The shared-forward methods run together, as
    served; if that call fails, each runs alone so the failure is pinned to its method."""
    explanations, errors = {}, {}
    try:
        _, together = explainers.predict_and_explain(model, inputs, SHARED_FORWARD_METHODS)
        explanations.update(together)
    except Exception:
        for method in SHARED_FORWARD_METHODS:
            try:
                explanations.update(explainers.predict_and_explain(model, inputs, [method])[1])
            except Exception as error:  # noqa: BLE001 - recorded and asserted on per method
                errors[method] = _describe(error)
    for method, options in methods_options.items():
        try:
            explanations.update(explainers.predict_and_explain(model, inputs, [method], **{method: options})[1])
        except Exception as error:  # noqa: BLE001
            errors[method] = _describe(error)
    return explanations, errors


def smoke_problems(name: str, model, size: int, batch: int = 1, path_methods: bool = True) -> list[str]:
    """Every method on ``model``: what went wrong, as readable lines (empty when all is well).

    ``path_methods=False`` leaves out integrated gradients, SmoothGrad and occlusion, which use
    the model as a black box (forward and plain gradient only): the battery runs them on each
    family's smaller members and spares the largest ones their extra passes.
    """
    inputs = noise_inputs(size, batch)
    fingerprint = ModelFingerprint(model)
    expected_sites = reference_sites(model, inputs)
    explanations, errors = explain_every_method(model, inputs, other_methods_options(size) if path_methods else {})
    problems = [f"{method} failed: {error}" for method, error in errors.items()]
    problems += [f"model changed: {line}" for line in fingerprint.differences(model)]

    for method, explanation in explanations.items():
        maps = explanation.attributions
        shape = (batch, 1, size, size) if method in ONE_CHANNEL_METHODS else (batch, 3, size, size)
        if tuple(maps.shape) != shape:
            problems.append(f"{method}: shape {tuple(maps.shape)}, expected {shape}")
        elif not torch.isfinite(maps).all():
            problems.append(f"{method}: non-finite values")
        if method in RULE_METHODS and dict(explanation.rule_sites) != expected_sites:
            problems.append(f"{method}: rule_sites {dict(explanation.rule_sites)}, the reference counts {expected_sites}")
    if "saliency" in explanations and not explanations["saliency"].attributions.abs().max() > 0:
        problems.append("saliency is zero everywhere: the calibrated model passes no gradient")
    if expected_sites and "saliency" in explanations:
        plain = explanations["saliency"].attributions
        for method in ("guided_backprop", "deconvnet"):
            if method in explanations and relative_difference(explanations[method].attributions, plain) <= DIFFERENT_BY:
                problems.append(f"{method} equals the plain gradient although the model has activation sites {expected_sites}")

    TABLE.setdefault(name, {}).update({
        "size": size,
        "methods": {method: ("ok" if method in explanations else errors.get(method, "missing"))
                    for method in (*SHARED_FORWARD_METHODS, *(other_methods_options(size) if path_methods else ()))},
        "reference_sites": expected_sites,
        "rule_sites": dict(explanations["guided_backprop"].rule_sites) if "guided_backprop" in explanations else None,
    })
    return problems


def reference_problems(name: str, model, size: int) -> list[str]:
    """Saliency, guided backprop and DeconvNet against the explicit-rule reference, two rows, two targets."""
    inputs = noise_inputs(size, batch=2, seed=1)
    with torch.no_grad():
        logits = explainers.logits_of(model(inputs))
    targets = torch.stack([logits[0].argmax(), logits[1].argmin()])
    methods = ("saliency", "guided_backprop", "deconvnet")
    _, explanations = explainers.predict_and_explain(model, inputs, methods, target=targets)
    problems, measured = [], {}
    for method in methods:
        expected, sites = explicit_rule_attribution(model, inputs, targets, method, copy_model=False)
        difference = relative_difference(explanations[method].attributions, expected)
        measured[method] = difference
        if difference > REFERENCE_RTOL:
            problems.append(f"{method}: differs from the explicit-rule reference by {difference:.3g} of its maximum "
                            f"(product sites {dict(explanations[method].rule_sites)}, reference sites {sites})")
    TABLE.setdefault(name, {})["reference_difference"] = measured
    return problems


def write_table() -> None:
    """Merges this process's rows into the file: under pytest-xdist each worker has some models."""
    path = os.environ.get("XAI_MODEL_TABLE")
    if path and TABLE:
        with open(path, "a+") as stream:
            fcntl.flock(stream, fcntl.LOCK_EX)
            stream.seek(0)
            text = stream.read()
            table = json.loads(text) if text.strip() else {}
            for name, row in TABLE.items():
                table.setdefault(name, {}).update(row)
            stream.seek(0)
            stream.truncate()
            json.dump(table, stream, indent=1, sort_keys=True, default=str)
