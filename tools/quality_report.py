"""``python -m tools.quality_report``: how far to trust each explainer, on the demo models or any model.

    python -m tools.quality_report [--demo allconv maxpool]      # default: both demo architectures
    python -m tools.quality_report --mar model_store/mymodel.mar
    python -m tools.quality_report --torchvision resnet50 [--weights resnet50.pt] [--input-size 224]
    python -m tools.quality_report --timm convnext_tiny [--weights w.pt]

Runs every registered explainer (with the options the model is served with) and writes
``reports/quality[-NAME].json``, ``.md`` (a table) and ``.png`` (inputs, masks and each method's
maps, trained vs randomised model): ``quality.*`` for the served demo (AllConvNet),
``quality-maxpool.*`` for the demo's max-pooling network, ``quality-<model name>.*`` otherwise.

The demo models are evaluated on freshly generated shapes with exact object masks; any other model
on its archive's sample images or generated probes, without masks, so pointing game and mask
energy are reported as not applicable there (see :mod:`tools.quality_sources`). The metrics
themselves take any model, inputs and masks.

Budget (2 CPU cores): each demo model takes 2-4 minutes (plus its training, about a minute, the
first time); every method sees the same images, the expensive ones only the first few of them (see
:data:`EXPENSIVE_BUDGETS`). Other models get fewer images, deletion steps and cascade steps by
default (:data:`MODEL_DEFAULTS`), since one forward of an ImageNet model costs what a few hundred
of the demo's do.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
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
from explainers.errors import UnsupportedModelError
from explainers.registry import available, create
from tools.quality_figure import MethodMaps, quality_grid
from tools.quality_sources import NO_MASKS, ModelSource, probe_images

# Disjoint from the demo's training stream (seed 0) and its held-out set (seed 1_000_003).
EVALUATION_SEED = 7_000_001
DEFAULT_IMAGES = 256
DEFAULT_CASCADE_IMAGES = 64
DEFAULT_STEPS = 32
DEFAULT_EXAMPLES = 4
# Blurred this much, the demo's shapes score near chance (measured: mean top-1 probability 0.23
# with 5 classes), so the insertion curve starts from "no shape evidence". Other input sizes scale
# it with the image side (21 px at 224).
INSERTION_BLUR_SIGMA = 6.0
INSERTION_BLUR_REFERENCE_SIDE = 64
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
    "score_cam": Budget(images=64, cascade_images=16),
    "ablation_cam": Budget(images=64, cascade_images=16),
}


# Models other than the demo's (an ImageNet ResNet-50 forward costs what ~300 demo forwards do):
# 16 images (probes or samples), 16 deletion steps, 4 cascade images over at most 8 cascade steps.
MODEL_EXPENSIVE_BUDGETS: Mapping[str, Budget] = {
    "integrated_gradients": Budget(images=4, cascade_images=2),
    "smoothgrad": Budget(images=4, cascade_images=2),
    "occlusion": Budget(images=4, cascade_images=1),
    "score_cam": Budget(images=4, cascade_images=1),
    "ablation_cam": Budget(images=4, cascade_images=1),
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
    # At most this many cascade steps (evenly spaced over the layers, first and last kept); None: every layer.
    cascade_steps: int | None = None

    def budget(self, method: str) -> Budget:
        """The method's budget, never more than the report's own image counts."""
        budget = self.expensive_budgets.get(method, Budget(self.images, self.cascade_images))
        images = min(budget.images, self.images)
        return Budget(images, min(budget.cascade_images, self.cascade_images, images))


MODEL_DEFAULTS = ReportSettings(images=16, cascade_images=4, steps=16, cascade_steps=8,
                                expensive_budgets=dict(MODEL_EXPENSIVE_BUDGETS))


@dataclass(frozen=True)
class EvaluationData:
    images: torch.Tensor  # [N, 3, H, W] in [0, 1], as a person sees them
    inputs: torch.Tensor  # [N, 3, H, W] normalised, as the model sees them
    masks: torch.Tensor | None  # [N, H, W] bool; None: no object masks, localisation not applicable
    labels: torch.Tensor | None  # [N]; None: the true classes are unknown
    top: torch.Tensor  # [N] the model's top-1 class
    least: torch.Tensor  # [N] the model's least likely class
    deletion_baseline: torch.Tensor
    insertion_baseline: torch.Tensor


@dataclass(frozen=True)
class MapScores:
    """Per-image scores of one method (or reference), before summarising."""

    deletion: torch.Tensor
    insertion: torch.Tensor
    pointing: torch.Tensor | None  # None: no masks
    energy: torch.Tensor | None
    class_similarity: torch.Tensor
    image_similarity: torch.Tensor
    deletion_curve: torch.Tensor  # [N, S + 1]


def load_data(source: ModelSource, settings: ReportSettings) -> tuple[EvaluationData, str]:
    """The images to evaluate on, as the model sees them, and where they came from.

    Demo models: freshly generated shapes with their masks and labels. Others: the archive's
    sample images (at most ``settings.images``), else as many probes (:func:`probe_images`).
    """
    if source.demo_architecture is not None:
        from demo import shapes

        batch = shapes.generate_torch(settings.images, settings.seed)
        images, masks, labels = batch.images, batch.masks, batch.labels
        origin = f"{settings.images} freshly generated shapes (seed {settings.seed}), exact object masks"
    elif source.sample_images:
        chosen = source.sample_images[: settings.images]
        images = torch.from_numpy(np.stack(chosen)).float() / 255.0
        masks = labels = None
        origin = f"{len(chosen)} sample image(s) packed in the archive"
    else:
        images = probe_images(settings.images, settings.seed, source.input_size)
        masks = labels = None
        origin = (f"{settings.images} probes (seed {settings.seed}): demo shapes at {source.input_size[0]}x"
                  f"{source.input_size[1]} pasted on uniform noise")
    mean = torch.tensor(source.mean, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(source.std, dtype=images.dtype).view(1, -1, 1, 1)
    inputs = (images - mean) / std
    with torch.no_grad():
        logits = _logits(source.model(inputs))
    top, least = top_and_least_likely(logits)
    sigma = INSERTION_BLUR_SIGMA * min(source.input_size) / INSERTION_BLUR_REFERENCE_SIDE
    data = EvaluationData(images, inputs, masks, labels, top, least, constant_baseline(inputs),
                          blurred_baseline(inputs, sigma))
    return data, origin


def _logits(output) -> torch.Tensor:
    from explainers import logits_of

    return logits_of(output)


def score_maps(model: nn.Module, data: EvaluationData, importance: torch.Tensor, class_similarity: torch.Tensor,
               image_similarity: torch.Tensor, steps: int) -> MapScores:
    """Every per-image metric of ``importance`` maps for the first ``len(importance)`` images (the
    similarities need other maps, so they come computed)."""
    rows = slice(0, len(importance))
    inputs, top = data.inputs[rows], data.top[rows]
    deletion = deletion_curve(model, inputs, importance, top, baseline=data.deletion_baseline[rows], steps=steps)
    insertion = insertion_curve(model, inputs, importance, top, baseline=data.insertion_baseline[rows], steps=steps)
    masks = data.masks[rows] if data.masks is not None else None
    return MapScores(
        deletion=deletion.auc,
        insertion=insertion.auc,
        pointing=pointing_game(importance, masks, POINTING_TOLERANCE) if masks is not None else None,
        energy=mask_energy(importance, masks) if masks is not None else None,
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
        "pointing_game": summary(scores.pointing) if scores.pointing is not None else None,
        "mask_energy": summary(scores.energy) if scores.energy is not None else None,
        "class_map_similarity": summary(scores.class_similarity),
        "image_map_similarity": summary(scores.image_similarity),
    }
    not_applicable = [name for name, stats in per_metric.items() if stats is None]
    per_metric = {name: stats for name, stats in per_metric.items() if stats is not None}
    entry = {name: _round(stats["mean"]) for name, stats in per_metric.items()}
    for name in not_applicable:
        entry[name] = None
    if not_applicable:
        entry["not_applicable"] = not_applicable
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
                                    data.top[: budget.cascade_images], options=options, seed=RANDOMIZATION_SEED,
                                    max_steps=settings.cascade_steps)
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
    shape = (data.images.shape[0], *data.images.shape[2:])
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


def run(settings: ReportSettings, source: ModelSource, progress=print) -> tuple[dict, Image.Image]:
    """The report's JSON document and its figure (a PIL image) for one model."""
    started = time.perf_counter()
    model = source.model
    data, origin = load_data(source, settings)
    methods = settings.methods or tuple(available())
    localisation = ({"applicable": True} if data.masks is not None else {"applicable": False, "reason": NO_MASKS})
    document = {
        "model": source.description,
        "source": source.name,
        "input_size": list(source.input_size),
        "images": len(data.images),
        "images_from": origin,
        "seed": settings.seed,
        "accuracy": _round(float((data.top == data.labels).double().mean())) if data.labels is not None else None,
        "mask_area": _round(float(data.masks.double().mean())) if data.masks is not None else None,
        "localisation": localisation,
        "notes": list(source.notes),
        "settings": {
            "steps": settings.steps,
            "channel_reduction": "sum over channels of |attribution| (CAM maps: the map itself)",
            "deletion_baseline": "constant 0 in model input space (the normalisation mean)",
            "insertion_baseline": f"Gaussian blur, sigma "
                                  f"{INSERTION_BLUR_SIGMA * min(source.input_size) / INSERTION_BLUR_REFERENCE_SIDE:g} px",
            "pointing_tolerance_px": POINTING_TOLERANCE,
            "randomization": "cascading from the top layer; each parameter redrawn from N(mean, std) of the trained tensor",
            "similarity": "Spearman rank correlation of importance maps; a constant map against a varying one scores 0",
            "randomization_similarity": "mean over the cascade steps (per step: mean over images)",
            "explainer_options": source.options_from,
            "cascade_images": settings.cascade_images,
            "cascade_steps": settings.cascade_steps or "every layer",
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
            try:
                entry, maps = evaluate_method(model, data, method, source.explainer_options.get(method, {}), settings)
            except UnsupportedModelError as error:  # e.g. lrp on a model with an operation it has no rule for
                document.setdefault("unavailable", {})[method] = error.to_dict()
                progress(f"{source.name} {method}: unavailable ({error})")
                continue
        document["methods"][method] = entry
        rows.append(maps)
        progress(f"{source.name} {method}: {entry['seconds']} s on {entry['images']} images")
    document["references"] = evaluate_references(model, data, settings)
    # Examples come from the images every method's cascade saw; one per class first.
    classes = data.labels if data.labels is not None else data.top
    shown = example_indices(classes[: min([len(data.images), *(len(row.columns[0]) for row in rows)])],
                            settings.examples)
    masks = data.masks if data.masks is not None else torch.zeros(data.images.shape[0], *data.images.shape[2:],
                                                                   dtype=torch.bool)
    figure = quality_grid(
        data.images[shown].numpy(), masks[shown].numpy(),
        [MethodMaps(row.name, [maps[shown] for maps in row.columns]) for row in rows], FIGURE_COLUMNS,
        captions=[source.class_names[int(index)][:24] for index in classes[shown]])
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
    if document["localisation"]["applicable"]:
        about_images = (f"{document['images_from']}, top-1 accuracy {document['accuracy']:.3f}; objects cover "
                        f"{100 * document['mask_area']:.1f} % of the image on average (the chance level of mask energy; "
                        "the random reference row gives every chance level)")
    else:
        about_images = (f"{document['images_from']}; {document['localisation']['reason']} (n/a below); the random "
                        "reference row gives every chance level")
    lines = [
        "# Explanation quality",
        "",
        f"Model: {document['model']}, input {document['input_size'][0]}x{document['input_size'][1]}; {about_images}. "
        f"Written by `python -m tools.quality_report` in {document['seconds']:.0f} s.",
        *(f"\nNote: {note}." for note in document.get("notes", [])),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, entry in document["methods"].items():
        lines.append("| " + " | ".join([f"`{name}`", str(entry["images"]), *(_cell(entry[m]) for m in shown)]) + " |")
    for name, entry in document.get("references", {}).items():
        cells = [_cell(entry[m]) for m in shown]
        lines.append("| " + " | ".join([f"*{name} (reference)*", str(document["images"]), *cells]) + " |")
    for name, error in document.get("unavailable", {}).items():
        lines.append(f"\n`{name}` cannot explain this model: {error['message']}")
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


def report_stem(source_name: str) -> str:
    """``quality`` for the served demo, ``quality-<name>`` for any other model."""
    safe = "".join(character if character.isalnum() or character in "-_." else "-" for character in source_name)
    return "quality" if source_name == "demo" else f"quality-{safe}"


def write_report(document: Mapping, figure, out_dir: Path, stem: str = "quality") -> list[Path]:
    """Writes ``<stem>.json``, ``.md`` and ``.png`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    paths[1].write_text(markdown(document).replace("](quality.png)", f"]({paths[2].name})"))
    # A 256-colour palette (no dithering) looks the same here and makes the file 2-3 times smaller.
    figure.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(paths[2], optimize=True)
    return paths


def _round(value: float | None) -> float | None:
    """4 decimals, and None (JSON null) for an undefined value."""
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> None:
    from demo.train import ARCHITECTURES

    parser = argparse.ArgumentParser(description="Explanation quality of every registered explainer on the demo models "
                                                 "or on any archived, torchvision or timm model.")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="directory for quality[-NAME].{json,md,png}")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--demo", nargs="+", choices=sorted(ARCHITECTURES), metavar="ARCHITECTURE",
                       help=f"demo architectures ({', '.join(ARCHITECTURES)}; default: all of them)")
    model.add_argument("--mar", type=Path, help="a model archive: its model, preprocessing, class names and sample images")
    model.add_argument("--torchvision", metavar="NAME", help="a torchvision classification model by name")
    model.add_argument("--timm", metavar="NAME", help="a timm model by name")
    named = parser.add_argument_group("with --torchvision or --timm")
    named.add_argument("--weights", type=Path, help="state dict (default: random weights, batch norms calibrated on noise)")
    named.add_argument("--input-size", type=int, nargs="+", metavar="PIXELS", help="height [width] (default: the model's standard)")
    named.add_argument("--class-names", type=Path, help="JSON list or index_to_name map (sets the number of classes)")
    parser.add_argument("--images", type=int, help=f"images (default: {DEFAULT_IMAGES} for the demo models, "
                                                   f"{MODEL_DEFAULTS.images} otherwise)")
    parser.add_argument("--cascade-images", type=int, help=f"images of the randomisation cascade (default: "
                                                           f"{DEFAULT_CASCADE_IMAGES} / {MODEL_DEFAULTS.cascade_images})")
    parser.add_argument("--cascade-steps", type=int, help=f"at most this many cascade steps (default: every layer / "
                                                          f"{MODEL_DEFAULTS.cascade_steps})")
    parser.add_argument("--steps", type=int, help=f"deletion/insertion steps (default: {DEFAULT_STEPS} / {MODEL_DEFAULTS.steps})")
    parser.add_argument("--seed", type=int, default=EVALUATION_SEED)
    parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES, help="examples in the figure")
    parser.add_argument("--methods", nargs="*", default=[], help="explainers to evaluate (default: all)")
    arguments = parser.parse_args(argv)
    for name in ("images", "cascade_images", "cascade_steps", "steps", "examples"):
        value = getattr(arguments, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    is_named = arguments.torchvision or arguments.timm
    if not is_named and (arguments.weights or arguments.input_size or arguments.class_names):
        parser.error("--weights, --input-size and --class-names go with --torchvision or --timm")
    if arguments.input_size and len(arguments.input_size) > 2:
        parser.error("--input-size takes a height and an optional width")

    sources = list(_sources(arguments))
    for source_factory in sources:
        source = source_factory()
        defaults = ReportSettings() if source.demo_architecture is not None else MODEL_DEFAULTS
        chosen = {name: getattr(arguments, name) for name in ("images", "cascade_images", "cascade_steps", "steps")
                  if getattr(arguments, name) is not None}
        settings = replace(defaults, seed=arguments.seed, examples=arguments.examples, methods=tuple(arguments.methods),
                           **chosen)
        # Captum warns that integrated gradients' internal batch (32, the served option) is smaller than
        # the report's batch of images and uses the larger one: a speed detail, not a change of result.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Internal batch size cannot be less than the number of input examples")
            document, figure = run(settings, source)
        for path in write_report(document, figure, arguments.out, report_stem(source.name)):
            print(path)


def _sources(arguments):
    """Factories of the sources to evaluate, so each model is built only when its turn comes."""
    from tools import quality_sources as sources

    class_names = None
    if arguments.class_names:
        from serving.class_names import load_class_names

        class_names = load_class_names(arguments.class_names)
    if arguments.mar:
        yield lambda: sources.mar_source(arguments.mar)
    elif arguments.torchvision:
        yield lambda: sources.torchvision_source(arguments.torchvision, arguments.weights, arguments.input_size, class_names)
    elif arguments.timm:
        yield lambda: sources.timm_source(arguments.timm, arguments.weights, arguments.input_size, class_names)
    else:
        from demo.train import ARCHITECTURES

        for architecture in arguments.demo or ARCHITECTURES:
            yield lambda architecture=architecture: sources.demo_source(architecture)


if __name__ == "__main__":
    main()
