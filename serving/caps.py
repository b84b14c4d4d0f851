"""Cost caps: the most work one request may make a worker do, and the check every explainer passes.

Every explainer states its cost (:meth:`explainers.Explainer.cost`); the caps bound that, for
built-in and registered explainers alike. Three methods had caps of their own before the generic
one, under names operators already use in model-config.yaml: they keep them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from explainers import Explainer
from explainers.errors import CostCapExceededError, InvalidOptionError

# Caps that bound one method's evaluations under an older, method-specific name.
NAMED_EVALUATION_CAPS = {
    "integrated_gradients": "max_integrated_gradients_steps",
    "smoothgrad": "max_smoothgrad_samples",
    "occlusion": "max_occlusion_evaluations",
}


@dataclass(frozen=True)
class CostCaps:
    """Upper bounds on the work one request may ask for (explanations are expensive)."""

    max_image_pixels: int = 16_000_000
    max_explainers_per_request: int = 3
    max_explained_classes: int = 3
    max_integrated_gradients_steps: int = 128
    max_smoothgrad_samples: int = 50
    max_occlusion_evaluations: int = 1024
    # Model evaluations (rows forwarded) per explained class for every other explainer, registered
    # ones included, as each states in its cost(); the shared forward pass is free.
    max_evaluations_per_explanation: int = 256
    max_top_k: int = 10
    # Rows one forward pass of a batched method may take (integrated_gradients internal_batch_size,
    # else n_steps; smoothgrad batch_size, else samples; occlusion perturbations_per_eval): bounds
    # the memory a request can make a worker allocate at once.
    max_batch_per_forward: int = 128
    # Side of the grid maps are averaged down to before they leave the server (None: full maps).
    coarse_output: int | None = None
    # Pixels of a map returned in the image frame ("frame": "image"): an original with more gets its
    # map, and overlay, at the largest size of the same aspect ratio within this (a 1-megapixel
    # overlay PNG of a photo is 1-3 MB; at the 16 MP the decoder accepts it would be tens of MB).
    max_frame_pixels: int = 1_048_576
    # Deletion steps a request's quality score may cost (steps + 1 extra forwards of the image);
    # 0 turns quality scores off for the model.
    max_quality_steps: int = 16

    def __post_init__(self):
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name == "coarse_output" and value is None:
                continue
            if spec.name == "max_quality_steps" and value == 0 and not isinstance(value, bool):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"caps.{spec.name} must be a positive integer, got {value!r}")


def check_cost(explainer: Explainer, caps: CostCaps, input_size: tuple[int, int]) -> None:
    """Refuses an explainer whose stated cost on an ``input_size`` image is over a cap.

    Raises:
        CostCapExceededError: naming the cap and the option that lowers the cost.
        InvalidOptionError: options that cannot explain an image of this size.
    """
    cost = explainer.cost(*input_size)
    cap_name = NAMED_EVALUATION_CAPS.get(explainer.name, "max_evaluations_per_explanation")
    cap = getattr(caps, cap_name)
    if cost.evaluations > cap:
        lower = f": lower its option {cost.evaluations_option}" if cost.evaluations_option else ""
        raise CostCapExceededError(
            f"{explainer.name} needs {cost.evaluations} model evaluations, over the cap of {cap}{lower}", cap=cap_name)
    if cost.rows_per_forward > caps.max_batch_per_forward:
        lower = f": set its option {cost.batch_option} to at most that" if cost.batch_option else ""
        raise CostCapExceededError(
            f"{explainer.name} would run {cost.rows_per_forward} rows in one forward pass, over the cap of "
            f"{caps.max_batch_per_forward}{lower}", cap="max_batch_per_forward")
