"""The models ``python -m tools.quality_report`` evaluates, and the images it evaluates them on.

Three kinds of source:

- a demo architecture (``--demo allconv maxpool``): trained on the synthetic shapes, evaluated on
  freshly generated shapes whose object masks are exact, so every metric applies;
- a model archive (``--mar path.mar``): the model file and state dict named by its manifest, loaded
  as the handler loads them, with the preprocessing (input size, mean, std), class names and
  explainer options of its model-config.yaml ``handler:`` section;
- a model by name (``--torchvision NAME`` / ``--timm NAME``, weights from ``--weights`` or random):
  that library's standard input size, mean and std for the model.

Images for an archive or a named model: the image files packed in the archive (any ``.png``,
``.jpg``, ``.jpeg``, ``.webp``, ``.bmp`` or ``.gif`` member outside ``MAR-INF/``, e.g. added with
``tools.archive --extra-files``), decoded and resized as the server does; else generated *probes*:
the demo's shapes drawn at the model's input size and pasted on uniform noise (the shape's own
pixels kept, every background pixel replaced by noise). Nothing in these images carries a mask of
the object the model sees, so the localisation metrics (pointing game, mask energy) are reported as
not applicable for these sources.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
NO_MASKS = ("no object masks for these images (archive samples or generated probes): pointing game and mask "
            "energy are not applicable")


@dataclass(frozen=True)
class ModelSource:
    """A model to evaluate and how its inputs are made."""

    name: str  # also the report files' suffix: reports/quality-<name>.*
    description: str
    model: nn.Module
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    explainer_options: Mapping[str, Mapping] = field(default_factory=dict)
    demo_architecture: str | None = None  # set for the demo models: shapes with exact masks
    sample_images: tuple[np.ndarray, ...] = ()  # uint8 [3, H, W] at the input size, from an archive
    notes: tuple[str, ...] = ()
    options_from: str = "tools.quality_sources.generic_explainer_options (occlusion scaled to the input size)"


def generic_explainer_options(input_size: Sequence[int]) -> dict[str, dict]:
    """Options for a model served without its own: the demo's, occlusion's window scaled to the
    image (an eighth of its side, stride half of that: 225 evaluations, as on the demo)."""
    side = min(input_size)
    window = max(1, round(side / 8))
    return {"integrated_gradients": {"n_steps": 32, "internal_batch_size": 32},
            "smoothgrad": {"samples": 16, "noise": 0.15},
            "occlusion": {"window": window, "stride": max(1, window // 2), "perturbations_per_eval": 16}}


def demo_source(architecture: str) -> ModelSource:
    from demo import train as training
    from demo.model_cache import BUILD_DIR, trained_demo_model
    from demo.preprocessing import INPUT_SIZE, NORMALIZE_MEAN, NORMALIZE_STD
    from demo.shapes import CLASS_NAMES
    from tools.demo_store import CONFIG_FILE

    model = trained_demo_model(architecture=architecture)
    options = yaml.safe_load(CONFIG_FILE.read_text())["handler"].get("explainer_options", {})
    summary_path = BUILD_DIR / training.summary_file(architecture)
    held_out = json.loads(summary_path.read_text()).get("held_out_accuracy") if summary_path.exists() else None
    cls = type(model).__name__
    return ModelSource(
        name="demo" if architecture == training.DEFAULT_ARCHITECTURE else architecture,
        description=f"{cls} (demo shapes: circle, square, triangle, cross, star), "
                    f"model_store/build/{training.state_file(architecture)}",
        model=model, input_size=(INPUT_SIZE, INPUT_SIZE), mean=NORMALIZE_MEAN, std=NORMALIZE_STD,
        class_names=CLASS_NAMES, explainer_options=options, demo_architecture=architecture,
        options_from="as served: handler.explainer_options of model_store/shapes/model-config.yaml",
        notes=(f"held-out accuracy at training: {held_out:.4f}",) if held_out is not None else ())


def mar_source(path: Path) -> ModelSource:
    """The model of a .mar, loaded as the handler loads it (model file + state dict of its manifest)."""
    from handlers.model_loading import load_eager_model
    from serving.images import Preprocessor, decode_image
    from serving.settings import ServingSettings

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="quality-mar-") as staging, zipfile.ZipFile(path) as archive:
        archive.extractall(staging)
        root = Path(staging)
        manifest = json.loads((root / "MAR-INF" / "MANIFEST.json").read_text())["model"]
        config_name = manifest.get("configFile")
        config = yaml.safe_load((root / config_name).read_text()) if config_name else {}
        settings = ServingSettings.from_mapping(config.get("handler", {}), root)
        model = load_eager_model(root / manifest["modelFile"], root / manifest["serializedFile"], torch.device("cpu"))
        preprocessor = Preprocessor(size=settings.input_size, mean=settings.mean, std=settings.std,
                                    resize=settings.resize, interpolation=settings.interpolation)
        samples = []
        for member in sorted(archive.namelist()):
            if member.startswith("MAR-INF/") or not member.lower().endswith(IMAGE_SUFFIXES):
                continue
            image = decode_image(archive.read(member), max_pixels=settings.caps.max_image_pixels)
            samples.append(preprocessor.pixels(image).numpy())
    options = {**generic_explainer_options(settings.input_size), **settings.explainer_options}
    return ModelSource(
        name=manifest.get("modelName") or path.stem, description=f"{path.name} ({type(model).__name__})",
        model=model, input_size=settings.input_size, mean=settings.mean, std=settings.std,
        class_names=settings.class_names, explainer_options=options, sample_images=tuple(samples),
        options_from="the archive's handler.explainer_options, over tools.quality_sources.generic_explainer_options")


def torchvision_source(name: str, weights: Path | None = None, input_size: Sequence[int] | None = None,
                       class_names: Sequence[str] | None = None) -> ModelSource:
    """A torchvision classification model: its weights' standard preprocessing and categories
    (read from torchvision's weight metadata, nothing downloaded), random weights unless given."""
    import torchvision

    num_classes = len(class_names) if class_names else None
    model = torchvision.models.get_model(name, weights=None, **({"num_classes": num_classes} if num_classes else {}))
    size, mean, std, categories = (224, 224), IMAGENET_MEAN, IMAGENET_STD, None
    try:
        standard = torchvision.models.get_model_weights(name).DEFAULT
        transform = standard.transforms()
        size = tuple(transform.crop_size) * (2 if len(transform.crop_size) == 1 else 1)
        mean, std = tuple(transform.mean), tuple(transform.std)
        categories = standard.meta.get("categories")
    except (ValueError, KeyError, AttributeError):  # a model without registered weights: ImageNet's
        pass
    return _named_source(f"torchvision-{name}", f"torchvision {name}", model, weights, input_size or size, mean,
                         std, class_names or categories)


def timm_source(name: str, weights: Path | None = None, input_size: Sequence[int] | None = None,
                class_names: Sequence[str] | None = None) -> ModelSource:
    """A timm model (pretrained=False): timm's data config for its input size, mean and std."""
    import timm
    from timm.data import resolve_data_config

    model = timm.create_model(name, pretrained=False, **({"num_classes": len(class_names)} if class_names else {}))
    config = resolve_data_config({}, model=model)
    return _named_source(f"timm-{name}", f"timm {name}", model, weights, input_size or tuple(config["input_size"][1:]),
                         tuple(config["mean"]), tuple(config["std"]), class_names)


def _named_source(name, description, model, weights, input_size, mean, std, class_names) -> ModelSource:
    height, width = (input_size[0], input_size[-1])
    notes = []
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        description += f", weights {Path(weights).name}"
    else:
        calibrate_batch_norms(model, torch.randn(4, 3, height, width, generator=torch.Generator().manual_seed(0)))
        description += ", random weights"
        notes.append("random weights (no --weights; batch norms calibrated on noise): the scores describe an untrained "
                     "network, a baseline to read a trained one against")
    model.eval()
    num_classes = _num_classes(model, (height, width))
    names = tuple(class_names) if class_names and len(class_names) == num_classes else tuple(
        f"class {index}" for index in range(num_classes))
    return ModelSource(name=name, description=description, model=model, input_size=(height, width), mean=tuple(mean),
                       std=tuple(std), class_names=names, explainer_options=generic_explainer_options((height, width)),
                       notes=tuple(notes))


@torch.no_grad()
def _num_classes(model: nn.Module, size: tuple[int, int]) -> int:
    from explainers import logits_of

    return int(logits_of(model(torch.zeros(1, 3, *size))).shape[-1])


@torch.no_grad()
def calibrate_batch_norms(model: nn.Module, example: torch.Tensor) -> None:
    """A randomly initialised model made to behave like a trained one, in two ways.

    Layers initialised to zero get small random weights: torchvision zero-initialises ViT's
    classifier head, and with it no gradient reaches any feature (a trained head is never zero).
    Batch-norm statistics are set from one train-mode forward: random statistics (mean 0, variance
    1) let activations grow or vanish layer after layer; a cumulative average over one noise batch
    sets them to what the layers see, so logits have a realistic spread and activation masks are
    mixed, as with trained weights.
    """
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (nn.Linear, nn.Conv2d)) and weight is not None and not bool(weight.any()):
                weight.normal_(0.0, 0.02)
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(example)
    model.eval()


def probe_images(count: int, seed: int, size: tuple[int, int]) -> torch.Tensor:
    """``[count, 3, H, W]`` in [0, 1]: the demo's shapes at the model's size, pasted on uniform noise."""
    from demo import shapes

    side = max(size)
    batch = shapes.generate(count, seed, size=side)
    images = torch.from_numpy(batch.images)
    mask = torch.from_numpy(batch.masks)[:, None]
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(seed))
    probes = torch.where(mask, images, noise)
    if tuple(probes.shape[-2:]) != tuple(size):
        probes = F.interpolate(probes, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return probes
