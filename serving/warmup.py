"""Paying a model's first-call costs at load, so that no request pays them.

The first explained request of a model traces it (``torch.fx``), checks the trace against the
model's own forward, and pays the allocator's and the kernels' first-call costs; on a large model
that is seconds. :func:`warm_up` runs the explained path once on an image of the model's input
size with its default explainers (their configured options included), and one predict forward.

The image is seeded uniform noise in pixel space, normalised with the model's mean and std: what a
request looks like to the model. Not zeros: in a ReLU network without biases (batch norms at their
initial statistics, random weights) a zero input activates no unit, so choices made from the
forward (Grad-CAM's default layer: the last feature map the output depends on) have nothing to go
on and the warm-up would fail where no real image does.

A failure is reported, not raised: the model still serves predictions, and each explanation
request then fails (or succeeds) on its own, with its typed error, as it would have without the
warm-up. The caller logs it loudly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from explainers import logits_of, predict_and_explain
from explainers.kernels.rule_models import RulePath, rule_path
from explainers.validation import model_device

from .settings import ServingSettings


@dataclass(frozen=True)
class WarmUp:
    """What the warm-up ran and how long it took (``error``: why it stopped, or None)."""

    seconds: float
    explainers: tuple[str, ...]
    error: BaseException | None = None
    path: RulePath | None = None  # how the explained forward runs, once it has run

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        """One log line's worth: time, explainers, and the failure if any."""
        names = ", ".join(self.explainers) or "none"
        outcome = "ok" if self.ok else f"FAILED ({type(self.error).__name__}: {self.error})"
        path = f"; explained forward: {self.path.kind} ({self.path.reason})" if self.path else ""
        return f"warm-up {outcome} in {self.seconds * 1000:.0f} ms; explainers: {names}{path}"


def warm_up_input(settings: ServingSettings) -> torch.Tensor:
    """``[1, 3, H, W]``: seeded noise pixels in ``[0, 1]``, normalised as the model's requests are."""
    pixels = torch.rand(1, 3, *settings.input_size, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(settings.mean).view(1, 3, 1, 1)
    std = torch.tensor(settings.std).view(1, 3, 1, 1)
    return (pixels - mean) / std


def warm_up(model: nn.Module, settings: ServingSettings) -> WarmUp:
    """Run the predict path and the default explainers once on a noise image (see the module doc)."""
    explainers = tuple(settings.default_explainers)
    options = {name: dict(settings.explainer_options.get(name, {})) for name in explainers}
    options = {name: value for name, value in options.items() if value}
    image = warm_up_input(settings).to(model_device(model))
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            logits_of(model(image))
        if explainers:
            predict_and_explain(model, image, list(explainers), **options)
    except Exception as error:  # reported to the caller, who logs it and keeps serving
        return WarmUp(time.perf_counter() - started, explainers, error, rule_path(model))
    return WarmUp(time.perf_counter() - started, explainers, None, rule_path(model))
