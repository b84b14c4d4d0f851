"""Explanation quality: how far to trust each explainer's maps, measured.

Framework-neutral metrics over any classifier and any registered explainer:

- faithfulness: :func:`deletion_curve` / :func:`insertion_curve` (areas in [0, 1]);
- localisation: :func:`pointing_game` and :func:`mask_energy` against object masks;
- class and input sensitivity: :func:`class_map_similarity` (Spearman, top-1 vs least likely
  class) and :func:`image_map_similarity` (same class, another image);
- the weight-randomisation sanity check: :func:`randomization_cascade`.

Every metric reads one importance map per image, :func:`importance_map` (``Σ_c |a_c|``).
``python -m tools.quality_report`` runs them all on the demo models, or on any archived, torchvision or timm model.
"""

from .localisation import mask_energy, pointing_game
from .maps import importance_map, rank_similarity, signed_map, spearman
from .perturbation import PerturbationCurve, blurred_baseline, constant_baseline, deletion_curve, insertion_curve
from .randomization import RandomizationCascade, cascade_layers, randomization_cascade
from .sensitivity import ClassSensitivity, class_map_similarity, image_map_similarity, top_and_least_likely

__all__ = [
    "ClassSensitivity",
    "PerturbationCurve",
    "RandomizationCascade",
    "blurred_baseline",
    "cascade_layers",
    "class_map_similarity",
    "constant_baseline",
    "deletion_curve",
    "image_map_similarity",
    "importance_map",
    "insertion_curve",
    "mask_energy",
    "pointing_game",
    "randomization_cascade",
    "rank_similarity",
    "signed_map",
    "spearman",
    "top_and_least_likely",
]
