"""Paying a model's first-call costs at load, so that no request pays them.

The first explained request of a model traces it (``torch.fx``), checks the trace against the
model's own forward, and pays the allocator's and the kernels' first-call costs; on a large model
that is seconds. :func:`warm_up` runs the explained path once on a zero image of the model's input
size with its default explainers (their configured options included), and one predict forward.

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
from explainers.validation import model_device

from .settings import ServingSettings


@dataclass(frozen=True)
class WarmUp:
    """What the warm-up ran and how long it took (``error``: why it stopped, or None)."""

    seconds: float
    explainers: tuple[str, ...]
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        """One log line's worth: time, explainers, and the failure if any."""
        names = ", ".join(self.explainers) or "none"
        outcome = "ok" if self.ok else f"FAILED ({type(self.error).__name__}: {self.error})"
        return f"warm-up {outcome} in {self.seconds * 1000:.0f} ms; explainers: {names}"


def warm_up(model: nn.Module, settings: ServingSettings) -> WarmUp:
    """Run the predict path and the default explainers once on a zero image (see the module doc)."""
    explainers = tuple(settings.default_explainers)
    options = {name: dict(settings.explainer_options.get(name, {})) for name in explainers}
    options = {name: value for name, value in options.items() if value}
    zeros = torch.zeros(1, 3, *settings.input_size, device=model_device(model))
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            logits_of(model(zeros))
        if explainers:
            predict_and_explain(model, zeros, list(explainers), **options)
    except Exception as error:  # reported to the caller, who logs it and keeps serving
        return WarmUp(time.perf_counter() - started, explainers, error)
    return WarmUp(time.perf_counter() - started, explainers)
