"""Perturbation methods and SmoothGrad, served through one adapter over Captum.

Integrated Gradients has its own kernel (``integrated_gradients.py``).
"""

from __future__ import annotations

import torch
from captum.attr import NoiseTunnel, Occlusion, Saliency
from torch import nn

from ..base import Cost, Explainer
from ..errors import InvalidOptionError
from ..options import fraction, number, optional_positive_int, positive_int
from ..outputs import logits_of
from ..registry import register


class CaptumExplainer(Explainer):
    """Adapter: a subclass builds its Captum attribution object and the ``attribute()`` keywords."""

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The forward function Captum calls: the model's logits, whatever wraps them."""
        return logits_of(self.model(inputs))

    def captum_method(self):
        raise NotImplementedError

    def captum_arguments(self, inputs: torch.Tensor) -> dict:
        return {}

    def attribute(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        method = self.captum_method()
        return method.attribute(inputs, target=targets, **self.captum_arguments(inputs)).detach()


@register("smoothgrad")
class SmoothGradExplainer(CaptumExplainer):
    """SmoothGrad (Smilkov et al. 2017): the signed gradient averaged over noisy copies.

    Options:
        samples: noisy copies per row (default 16).
        noise: noise standard deviation as a fraction of each row's value range (default 0.15).
        batch_size: noisy copies per forward pass (default: all at once).
    """

    def __init__(self, model: nn.Module, *, samples: int = 16, noise: float = 0.15,
                 batch_size: int | None = None):
        super().__init__(model)
        self.samples = positive_int("samples", samples)
        self.noise = fraction("noise", noise)
        self.batch_size = optional_positive_int("batch_size", batch_size)

    def cost(self, height: int, width: int) -> Cost:
        return Cost(evaluations=self.samples, backward_passes=self.samples,
                    rows_per_forward=min(self.batch_size or self.samples, self.samples),
                    evaluations_option="samples", batch_option="batch_size")

    def attribute(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        tunnel = NoiseTunnel(Saliency(self.logits))
        rows = []
        # Captum takes one noise level per input tensor; each row gets its own from its range.
        for row, target in zip(inputs.split(1), targets.split(1)):
            stdev = self.noise * float(row.max() - row.min())
            rows.append(tunnel.attribute(row, nt_type="smoothgrad", nt_samples=self.samples,
                                         nt_samples_batch_size=self.batch_size, stdevs=stdev,
                                         target=target, abs=False).detach())
        return torch.cat(rows)


@register("occlusion")
class OcclusionExplainer(CaptumExplainer):
    """Occlusion: the drop of the target score when a square window is set to ``baseline``.

    Options:
        window: side of the square window in pixels (default 8).
        stride: step between windows (default: half the window).
        baseline: value the window is filled with, in model-input space (default 0.0).
        perturbations_per_eval: occluded copies per forward pass (default 16).
    """

    def __init__(self, model: nn.Module, *, window: int = 8, stride: int | None = None,
                 baseline: float = 0.0, perturbations_per_eval: int = 16):
        super().__init__(model)
        self.window = positive_int("window", window)
        self.stride = positive_int("stride", stride if stride is not None else max(1, window // 2))
        self.baseline = number("baseline", baseline)
        self.perturbations_per_eval = positive_int("perturbations_per_eval", perturbations_per_eval)

    def evaluations(self, height: int, width: int) -> int:
        """Forward evaluations per row: one per window position, and Captum's one unoccluded forward."""
        if self.window > min(height, width):
            raise InvalidOptionError(f"occlusion window {self.window} is larger than the input {height}x{width}")
        rows = (height - self.window) // self.stride + 1
        cols = (width - self.window) // self.stride + 1
        return rows * cols + 1

    def cost(self, height: int, width: int) -> Cost:
        # Captum repeats the input perturbations_per_eval times per forward, however few windows remain.
        return Cost(evaluations=self.evaluations(height, width), backward_passes=0,
                    rows_per_forward=self.perturbations_per_eval,
                    evaluations_option="window", batch_option="perturbations_per_eval")

    def captum_method(self):
        return Occlusion(self.logits)

    def captum_arguments(self, inputs):
        channels, height, width = inputs.shape[1:]
        self.evaluations(height, width)
        return {"sliding_window_shapes": (channels, self.window, self.window),
                "strides": (channels, self.stride, self.stride), "baselines": self.baseline,
                "perturbations_per_eval": self.perturbations_per_eval}
