"""``python -m tools.quality_report``: how far to trust each explainer, on the demo model.

Runs every registered explainer (with the options the demo model is served with) on freshly
generated shapes, and writes ``reports/quality.json``, ``reports/quality.md`` (a table) and
``reports/quality.png`` (inputs, masks and each method's maps, trained vs randomised model).

This is the one module of the evaluation package that knows the demo (dataset, model, config); the
metrics themselves take any model, inputs and masks.

Budget (2 CPU cores, under 10 minutes with the demo model's training included): every method sees
the same images, the expensive ones only the first few of them; see :data:`EXPENSIVE_BUDGETS`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from explainers.evaluation.localisation import mask_energy, pointing_game
from explainers.evaluation.maps import importance_map, rank_similarity
from explainers.evaluation.perturbation import blurred_baseline, constant_baseline, deletion_curve, insertion_curve
from explainers.evaluation.randomization import randomization_cascade
from explainers.evaluation.sensitivity import class_map_similarity, image_map_similarity, top_and_least_likely
from explainers.registry import available, create
from tools.quality_figure import MethodMaps, quality_grid

# Disjoint from the demo's training stream (seed 0) and its held-out set (seed 1_000_003).
EVALUATION_SEED = 7_000_001
DEFAULT_IMAGES = 256
DEFAULT_CASCADE_IMAGES = 64
DEFAULT_STEPS = 32
DEFAULT_EXAMPLES = 4
# Blurred this much, the demo's shapes score near chance (measured: mean top-1 probability 0.23
# with 5 classes), so the insertion curve starts from "no shape evidence".
INSERTION_BLUR_SIGMA = 6.0
# Gradient maps peak on the object's edge; two pixels (3 % of the 64-px image) forgive a maximum
# just outside the mask.
POINTING_TOLERANCE = 2.0
RANDOMIZATION_SEED = 0

METRICS = ("deletion_auc", "insertion_auc", "pointing_game", "mask_energy", "class_map_similarity",
           "randomization_similarity")
# Reported beside them: class sensitivity on the signed maps, and its converse (same class, another image).
EXTRA_METRICS = ("class_map_similarity_signed", "image_map_similarity")
# Which way is better, for the table's header.
BETTER = {"deletion_auc": "lower", "insertion_auc": "higher", "pointing_game": "higher", "mask_energy": "higher",
          "class_map_similarity": "lower", "randomization_similarity": "lower", "class_map_similarity_signed": "lower",
          "image_map_similarity": "lower"}
FIGURE_COLUMNS = ("trained", "classifier\nrandomised", "all layers\nrandomised")


@dataclass(frozen=True)
class Budget:
    """How many of the report's images a method is evaluated on (a prefix of the same images)."""

    images: int
    cascade_images: int


# Methods that pay many passes per map: 32 forward+backward (integrated gradients, n_steps 32),
# 16 (smoothgrad, 16 samples) and 225 forwards (occlusion, 8-px window, stride 4) per image and class,
# and each image is explained 3 times plus once per cascade step (7 for the demo model).
EXPENSIVE_BUDGETS: Mapping[str, Budget] = {
    "integrated_gradients": Budget(images=128, cascade_images=32),
    "smoothgrad": Budget(images=128, cascade_images=32),
    "occlusion": Budget(images=64, cascade_images=16),
}


@dataclass(frozen=True)
class ReportSettings:
    images: int = DEFAULT_IMAGES
    cascade_images: int = DEFAULT_CASCADE_IMAGES
    steps: int = DEFAULT_STEPS
    seed: int = EVALUATION_SEED
    examples: int = DEFAULT_EXAMPLES
    methods: tuple[str, ...] = ()  # empty: every registered explainer
    expensive_budgets: Mapping[str, Budget] = field(default_factory=lambda: dict(EXPENSIVE_BUDGETS))

    def budget(self, method: str) -> Budget:
        """The method's budget, never more than the report's own image counts."""
        budget = self.expensive_budgets.get(method, Budget(self.images, self.cascade_images))
        images = min(budget.images, self.images)
        return Budget(images, min(budget.cascade_images, self.cascade_images, images))


@dataclass(frozen=True)
class EvaluationData:
    images: torch.Tensor  # [N, 3, H, W] in [0, 1], as a person sees them
    inputs: torch.Tensor  # [N, 3, H, W] normalised, as the model sees them
    masks: torch.Tensor  # [N, H, W] bool
    labels: torch.Tensor  # [N]
    top: torch.Tensor  # [N] the model's top-1 class
    least: torch.Tensor  # [N] the model's least likely class
    deletion_baseline: torch.Tensor
    insertion_baseline: torch.Tensor


@dataclass(frozen=True)
class MapScores:
    """Per-image scores of one method (or reference), before summarising."""

    deletion: torch.Tensor
    insertion: torch.Tensor
    pointing: torch.Tensor
    energy: torch.Tensor
    class_similarity: torch.Tensor
    image_similarity: torch.Tensor
    deletion_curve: torch.Tensor  # [N, S + 1]


def load_demo(settings: ReportSettings) -> tuple[nn.Module, EvaluationData, Mapping[str, Mapping]]:
    """The trained demo model, freshly generated shapes, and the demo's served explainer options."""
    from demo import shapes
    from demo.model_cache import trained_demo_model
    from demo.preprocessing import normalize
    from tools.demo_store import CONFIG_FILE

    model = trained_demo_model()
    batch = shapes.generate_torch(settings.images, settings.seed)
    inputs = normalize(batch.images)
    with torch.no_grad():
        logits = model(inputs)
    top, least = top_and_least_likely(logits)
    data = EvaluationData(batch.images, inputs, batch.masks, batch.labels, top, least,
                          constant_baseline(inputs), blurred_baseline(inputs, INSERTION_BLUR_SIGMA))
    options = yaml.safe_load(CONFIG_FILE.read_text())["handler"].get("explainer_options", {})
    return model, data, options


def score_maps(model: nn.Module, data: EvaluationData, importance: torch.Tensor, class_similarity: torch.Tensor,
               image_similarity: torch.Tensor, steps: int) -> MapScores:
    """Every per-image metric of ``importance`` maps for the first ``len(importance)`` images (the
    similarities need other maps, so they come computed)."""
    rows = slice(0, len(importance))
    inputs, top = data.inputs[rows], data.top[rows]
    deletion = deletion_curve(model, inputs, importance, top, baseline=data.deletion_baseline[rows], steps=steps)
    insertion = insertion_curve(model, inputs, importance, top, baseline=data.insertion_baseline[rows], steps=steps)
    return MapScores(
        deletion=deletion.auc,
        insertion=insertion.auc,
        pointing=pointing_game(importance, data.masks[rows], POINTING_TOLERANCE),
        energy=mask_energy(importance, data.masks[rows]),
        class_similarity=class_similarity,
        image_similarity=image_similarity,
        deletion_curve=deletion.probabilities,
    )


def summary(values: torch.Tensor) -> dict:
    """Mean, standard error and count of the finite values (NaN marks an undefined score)."""
    finite = values[torch.isfinite(values)].double()
    count = int(finite.numel())
    mean = float(finite.mean()) if count else float("nan")
    stderr = float(finite.std(unbiased=True) / math.sqrt(count)) if count > 1 else float("nan")
    return {"mean": mean, "stderr": stderr, "count": count, "undefined": int(values.numel()) - count}


def scores_entry(scores: MapScores, randomization: dict) -> dict:
    """The JSON entry of one method: the headline numbers, then the details behind them."""
    per_metric = {
        "deletion_auc": summary(scores.deletion),
        "insertion_auc": summary(scores.insertion),
        "pointing_game": summary(scores.pointing),
        "mask_energy": summary(scores.energy),
        "class_map_similarity": summary(scores.class_similarity),
        "image_map_similarity": summary(scores.image_similarity),
    }
    entry = {name: _round(stats["mean"]) for name, stats in per_metric.items()}
    entry["randomization_similarity"] = randomization["summary"]
    entry["stderr"] = {name: _round(stats["stderr"]) for name, stats in per_metric.items()}
    undefined = {name: stats["undefined"] for name, stats in per_metric.items() if stats["undefined"]}
    if undefined:
        entry["undefined"] = undefined
    entry["deletion_curve"] = [_round(v) for v in scores.deletion_curve.mean(dim=0).tolist()]
    entry["randomization"] = randomization
    return entry


def evaluate_method(model: nn.Module, data: EvaluationData, method: str, options: Mapping,
                    settings: ReportSettings) -> tuple[dict, MethodMaps]:
    """One method's JSON entry and its example maps for the figure."""
    started = time.perf_counter()
    budget = settings.budget(method)
    explainer = create(method, model, **options)
    sensitivity = class_map_similarity(explainer, data.inputs[: budget.images])
    importance = importance_map(sensitivity.top.attributions)
    image_similarity = image_map_similarity(explainer, data.inputs[: budget.images], data.top[: budget.images], importance)
    scores = score_maps(model, data, importance, sensitivity.similarity, image_similarity, settings.steps)
    cascade = randomization_cascade(model, method, data.inputs[: budget.cascade_images],
                                    data.top[: budget.cascade_images], options=options, seed=RANDOMIZATION_SEED)
    per_layer = [summary(row) for row in cascade.similarity]
    signed_per_layer = [summary(row) for row in cascade.signed_similarity]
    means = [stats["mean"] for stats in per_layer if math.isfinite(stats["mean"])]
    randomization = {
        # Summary: the mean over the cascade, i.e. the area under Adebayo et al.'s cascade plot
        # (how long the map survives as layers are randomised from the top); 1 = never changes.
        "summary": _round(sum(means) / len(means)) if means else None,
        "at_full_randomization": _round(per_layer[-1]["mean"]),
        "images": budget.cascade_images,
        "cascade": [{"layer": layer, "similarity": _round(stats["mean"]), "signed_similarity": _round(signed["mean"]),
                     "undefined": stats["undefined"]}
                    for layer, stats, signed in zip(cascade.layers, per_layer, signed_per_layer)],
    }
    entry = scores_entry(scores, randomization)
    entry["class_map_similarity_signed"] = _round(summary(sensitivity.signed_similarity)["mean"])
    entry["images"] = budget.images
    entry["options"] = dict(options)
    entry["seconds"] = round(time.perf_counter() - started, 1)
    # Every cascade image is kept: the figure picks its examples once all methods have run.
    maps = MethodMaps(method, [cascade.trained_maps.numpy(), cascade.step_maps[0].numpy(),
                               cascade.randomized_maps.numpy()])
    return entry, maps


def edge_map(images: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` Sobel gradient magnitude of the image, summed over channels: a model-free map."""
    sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    kernels = torch.stack([sobel, sobel.T])[:, None].repeat(images.shape[1], 1, 1, 1)
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    gradients = F.conv2d(padded, kernels, groups=images.shape[1])  # [B, 2C, H, W], (x, y) per channel
    return gradients.view(images.shape[0], images.shape[1], 2, *images.shape[2:]).norm(dim=2).sum(dim=1)


def evaluate_references(model: nn.Module, data: EvaluationData, settings: ReportSettings) -> dict:
    """Two maps that explain nothing about the model, to read the methods' numbers against.

    ``random``: uniform noise (a fresh draw for the other class and for the "randomised" model),
    the chance level of every metric. ``edge_detector``: the image's Sobel edges, which ignore the
    model entirely, so its class and randomisation similarities are 1 by construction; a method
    that scores like it is showing the image, not the decision (Adebayo et al. 2018).
    """
    generator = torch.Generator().manual_seed(settings.seed)
    shape = data.masks.shape
    random_maps = torch.rand(shape, generator=generator)

    def fresh_draw() -> torch.Tensor:
        return rank_similarity(random_maps, torch.rand(shape, generator=generator))

    random = scores_entry(score_maps(model, data, random_maps, fresh_draw(), fresh_draw(), settings.steps),
                          _model_free_randomization(fresh_draw()))
    random["class_map_similarity_signed"] = _round(summary(fresh_draw())["mean"])
    edges = edge_map(data.images)
    next_image_edges = torch.roll(edges, shifts=-1, dims=0)
    edge = scores_entry(score_maps(model, data, edges, rank_similarity(edges, edges),
                                   rank_similarity(edges, next_image_edges), settings.steps),
                        _model_free_randomization(rank_similarity(edges, edges)))
    edge["class_map_similarity_signed"] = edge["class_map_similarity"]  # one map, whatever the class
    return {"random": random, "edge_detector": edge}


def _model_free_randomization(similarity: torch.Tensor) -> dict:
    # A map that does not read the weights is the same map whatever the weights: one value for the cascade.
    return {"summary": _round(summary(similarity)["mean"]), "model_free": True}


def run(settings: ReportSettings, progress=print) -> tuple[dict, Image.Image]:
    """The report's JSON document and its figure (a PIL image)."""
    started = time.perf_counter()
    model, data, served_options = load_demo(settings)
    methods = settings.methods or tuple(available())
    document = {
        "model": "AllConvNet (demo shapes: circle, square, triangle, cross, star), model_store/build/allconv_state.pt",
        "images": settings.images,
        "seed": settings.seed,
        "accuracy": _round(float((data.top == data.labels).double().mean())),
        "mask_area": _round(float(data.masks.double().mean())),
        "settings": {
            "steps": settings.steps,
            "channel_reduction": "sum over channels of |attribution| (CAM maps: the map itself)",
            "deletion_baseline": "constant 0 in model input space (the normalisation mean, mid grey)",
            "insertion_baseline": f"Gaussian blur, sigma {INSERTION_BLUR_SIGMA} px",
            "pointing_tolerance_px": POINTING_TOLERANCE,
            "randomization": "cascading from the top layer; each parameter redrawn from N(mean, std) of the trained tensor",
            "similarity": "Spearman rank correlation of importance maps; a constant map against a varying one scores 0",
            "randomization_similarity": "mean over the cascade steps (per step: mean over images)",
            "explainer_options": "as served: handler.explainer_options of model_store/shapes/model-config.yaml",
            "cascade_images": settings.cascade_images,
            "expensive_budgets": {name: asdict(budget) for name, budget in settings.expensive_budgets.items()},
        },
        "methods": {},
    }
    rows = []
    for method in methods:
        # Noise-drawing methods (smoothgrad) draw from torch's global generator: seeded per method,
        # so a report is reproducible and one method's draws do not depend on the others'.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            entry, maps = evaluate_method(model, data, method, served_options.get(method, {}), settings)
        document["methods"][method] = entry
        rows.append(maps)
        progress(f"{method}: {entry['seconds']} s on {entry['images']} images")
    document["references"] = evaluate_references(model, data, settings)
    from demo.shapes import CLASS_NAMES

    # Examples come from the images every method's cascade saw; one per class first.
    shown = example_indices(data.labels[: min([settings.images, *(len(row.columns[0]) for row in rows)])],
                            settings.examples)
    figure = quality_grid(
        data.images[shown].numpy(), data.masks[shown].numpy(),
        [MethodMaps(row.name, [maps[shown] for maps in row.columns]) for row in rows], FIGURE_COLUMNS,
        captions=[CLASS_NAMES[int(label)] for label in data.labels[shown]])
    document["seconds"] = round(time.perf_counter() - started, 1)
    return document, figure


def example_indices(labels: torch.Tensor, count: int) -> list[int]:
    """Up to ``count`` row indices: the first image of each class in order, then the next ones."""
    first_of_class = list({int(label): index for index, label in reversed(list(enumerate(labels.tolist())))}.values())
    chosen = sorted(first_of_class)[:count]
    rest = [index for index in range(len(labels)) if index not in chosen]
    return sorted(chosen + rest[: count - len(chosen)])


def markdown(document: Mapping) -> str:
    """The report's table and the cascade per layer, as Markdown."""
    arrows = {"lower": "↓", "higher": "↑"}
    shown = (*METRICS, *EXTRA_METRICS)
    header = ["method", "images", *(f"{name} {arrows[BETTER[name]]}" for name in shown)]
    lines = [
        "# Explanation quality",
        "",
        f"Model: {document['model']}; {document['images']} freshly generated images (seed {document['seed']}), "
        f"top-1 accuracy {document['accuracy']:.3f}; objects cover {100 * document['mask_area']:.1f} % of the "
        f"image on average (the chance level of mask energy; the random reference row gives every chance level). Written by "
        f"`python -m tools.quality_report` in {document['seconds']:.0f} s.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, entry in document["methods"].items():
        lines.append("| " + " | ".join([f"`{name}`", str(entry["images"]), *(_cell(entry[m]) for m in shown)]) + " |")
    for name, entry in document.get("references", {}).items():
        cells = [_cell(entry[m]) for m in shown]
        lines.append("| " + " | ".join([f"*{name} (reference)*", str(document["images"]), *cells]) + " |")
    settings = document["settings"]
    lines += [
        "",
        f"Deletion / insertion: area under the target's softmax probability as pixels are moved in map order "
        f"({settings['steps']} steps; deletion to {settings['deletion_baseline']}, insertion from a "
        f"{settings['insertion_baseline']}). Pointing game: the map's maximum within "
        f"{settings['pointing_tolerance_px']:g} px of the object. Mask energy: share of the map on the object. "
        "Class map similarity: Spearman correlation of the maps for the top-1 and the least likely class "
        "(signed: of the signed channel sums). "
        "Randomisation similarity: Spearman correlation of the trained and the randomised model's maps, "
        "averaged over the cascade below. Image map similarity: Spearman correlation of the maps of two "
        "different images for the same class (high: the map ignores the image). "
        "Maps are the channel sum of |attribution|. References: uniform noise maps (chance level) and "
        "the image's Sobel edges (a model-free map, similarities 1 by construction).",
        "",
        "## Weight randomisation cascade (Spearman, trained vs randomised; layers randomised from the top down)",
        "",
    ]
    cascades = {name: entry["randomization"]["cascade"] for name, entry in document["methods"].items()}
    if cascades:
        layers = [step["layer"] for step in next(iter(cascades.values()))]
        lines += ["| method | images | " + " | ".join(f"+{layer}" for layer in layers) + " |",
                  "|" + "---|" * (len(layers) + 2)]
        for name, cascade in cascades.items():
            images = document["methods"][name]["randomization"]["images"]
            lines.append(f"| `{name}` | {images} | " + " | ".join(_cell(step["similarity"]) for step in cascade) + " |")
    lines += ["", "![maps of the trained and the randomised model](quality.png)", ""]
    return "\n".join(lines)


def write_report(document: Mapping, figure, out_dir: Path) -> list[Path]:
    """Writes quality.json, quality.md and quality.png into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "quality.json", out_dir / "quality.md", out_dir / "quality.png"]
    paths[0].write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    paths[1].write_text(markdown(document))
    # A 256-colour palette (no dithering) looks the same here and makes the file 2-3 times smaller.
    figure.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(paths[2], optimize=True)
    return paths


def _round(value: float | None) -> float | None:
    """4 decimals, and None (JSON null) for an undefined value."""
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> None:
    defaults = ReportSettings()
    parser = argparse.ArgumentParser(description="Explanation quality of every registered explainer on the demo model.")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="directory for quality.{json,md,png}")
    parser.add_argument("--images", type=int, default=defaults.images)
    parser.add_argument("--cascade-images", type=int, default=defaults.cascade_images)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="deletion/insertion steps")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--examples", type=int, default=defaults.examples, help="examples in the figure")
    parser.add_argument("--methods", nargs="*", default=[], help="explainers to evaluate (default: all)")
    arguments = parser.parse_args(argv)
    for name in ("images", "cascade_images", "steps", "examples"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    settings = ReportSettings(images=arguments.images, cascade_images=arguments.cascade_images, steps=arguments.steps,
                              seed=arguments.seed, examples=arguments.examples, methods=tuple(arguments.methods))
    # Captum warns that integrated gradients' internal batch (32, the served option) is smaller than
    # the report's batch of images and uses the larger one: a speed detail, not a change of result.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Internal batch size cannot be less than the number of input examples")
        document, figure = run(settings)
    for path in write_report(document, figure, arguments.out):
        print(path)


if __name__ == "__main__":
    main()
