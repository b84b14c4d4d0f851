"""Served sanity checks: each allowed explainer's class and weight-randomisation sensitivity on the
served model, the thresholds that turn them into verdicts, and the policy that acts on them.

The scores are measured by :mod:`explainers.evaluation.sanity` on probe images: the archive's
sample images (``sample_images/`` at the archive root, see ``tools.archive --sample-images``), else
:func:`generated_probes`. They are computed when the model is archived and stored in the archive as
``sanity.json``, one entry per explainer keyed by a fingerprint of the weights, the options the
check ran with and the probes; at model load an entry whose fingerprint no longer matches (or a
missing one) is measured again, and written back beside the model so a restarted worker reuses it.

Thresholds are policy and stay out of the stored scores: changing them in ``model-config.yaml``
changes the verdicts at the next load without measuring anything again.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from explainers.errors import InvalidOptionError, PluginError
from explainers.evaluation.sanity import (
    DEFAULT_DELETION_STEPS,
    DEFAULT_RANDOMISATION_STEPS,
    SANITY_VERSION,
    SanityScores,
    fingerprint,
    model_digest,
    sanity_scores,
)
from explainers.registry import explainer_class

from .images import Preprocessor, decode_image

logger = logging.getLogger(__name__)

POLICIES = ("report", "warn", "refuse")
CHECKS = ("class_sensitive", "randomisation_sensitive")
SANITY_FILE = "sanity.json"
SAMPLE_IMAGES_DIR = "sample_images"
SAMPLE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# The most sample images the checks read: more buys little precision for a verdict and costs load time.
MAX_PROBES = 16
PROBE_SEED = 20_250_615
# Sample images are the archive author's own files, but still decoded with a bound (a 8k x 6k photo).
MAX_SAMPLE_PIXELS = 50_000_000

# The served options of the expensive methods make a check cost hundreds of passes per probe; the
# check runs them cheaper: at most 8 integration steps, at most 4 noise samples, occlusion windows
# that do not overlap (stride = window). The verdict is then the one of the method run this way,
# which for these methods (averages over paths, noise draws and windows) differs from the served
# one in precision, not in what the map depends on. Never more than the served cost; a model config
# overrides them per explainer (sanity.explainer_options).
CHECK_STEPS, CHECK_SAMPLES = 8, 4


def reduced_check_options(name: str, served: Mapping) -> dict:
    """The options explainer ``name`` is checked with by default, from the ones it is served with."""
    options = dict(served)
    if name == "integrated_gradients":
        options["n_steps"] = min(int(served.get("n_steps", 50)), CHECK_STEPS)
    elif name == "smoothgrad":
        options["samples"] = min(int(served.get("samples", 16)), CHECK_SAMPLES)
    elif name == "occlusion":
        window = served.get("window", 8)
        options["stride"] = max(int(served.get("stride") or max(1, window // 2)), int(window))
    return options


@dataclass(frozen=True)
class SanitySettings:
    """The ``sanity:`` mapping of a model's ``handler:`` section.

    Defaults reproduce the README's verdicts on the demo model ("How far to trust each
    explanation"): guided backprop's class map similarity (0.90 there, 0.92 on the archive's ten
    sample images) is over 0.85 and its randomisation similarity (0.64) over 0.5; every other method
    is under both, input x gradient, saliency and integrated gradients the closest (0.71-0.76, 0.31-0.33).

    Attributes:
        max_class_map_similarity: an explainer is class-sensitive when its mean class map
            similarity is below this.
        max_randomisation_similarity: randomisation-sensitive when its mean randomisation
            similarity is below this.
        probe_images: generated probes when the archive has no sample images.
        randomisation_steps: cascade steps evaluated (evenly spaced, the last randomises everything).
        deletion_steps: steps of the deletion curve.
        explainer_options: per explainer, options of the check that override the served ones.
        max_evaluations: model evaluations (rows, forward and backward) one explainer's checks may
            cost, as its stated :meth:`~explainers.Explainer.cost` predicts.
        max_cpu_seconds: CPU time all the checks measured when the model is archived may cost, as
            predicted from their evaluations and one timed forward and backward of the probes.
            Explainers are measured cheapest first; one that would not fit (or over max_evaluations)
            is not measured and its entry says why (the demo model's nine explainers need about 10
            CPU-seconds on an idle machine; the prediction is timed, so a busy machine inflates it:
            archiving is done once, so the budget leaves room).
        max_load_cpu_seconds: the same budget for checks measured when a worker loads the model
            (missing or stale in the archive): smaller, since the worker serves nothing meanwhile.
    """

    max_class_map_similarity: float = 0.85
    max_randomisation_similarity: float = 0.5
    probe_images: int = 8
    randomisation_steps: int = DEFAULT_RANDOMISATION_STEPS
    deletion_steps: int = DEFAULT_DELETION_STEPS
    explainer_options: Mapping[str, Mapping] = field(default_factory=dict)
    max_evaluations: int = 8192
    max_cpu_seconds: float = 60.0
    max_load_cpu_seconds: float = 5.0

    @classmethod
    def from_mapping(cls, section: Mapping | None) -> "SanitySettings":
        """Raises:
            InvalidOptionError: an unknown key or a bad value.
        """
        if section is None:
            return cls()
        if not isinstance(section, Mapping):
            raise InvalidOptionError(f"sanity must be a mapping of check settings, got {section!r}")
        known = {spec.name for spec in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise InvalidOptionError(f"unknown sanity setting(s) {unknown}; known: {sorted(known)}")
        values = dict(section)
        if "explainer_options" in values:
            options = values["explainer_options"]
            if not isinstance(options, Mapping) or not all(isinstance(v, Mapping) for v in options.values()):
                raise InvalidOptionError("sanity.explainer_options must map explainer names to option mappings")
            for name in options:
                explainer_class(name)
            values["explainer_options"] = {name: dict(value) for name, value in options.items()}
        settings = cls(**values)
        settings._check()
        return settings

    def _check(self) -> None:
        for name in ("max_class_map_similarity", "max_randomisation_similarity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
                raise InvalidOptionError(f"sanity.{name} must be a correlation in [-1, 1], got {value!r}")
        for name in ("max_cpu_seconds", "max_load_cpu_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidOptionError(f"sanity.{name} must be a positive number, got {value!r}")
        for name in ("probe_images", "randomisation_steps", "deletion_steps", "max_evaluations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"sanity.{name} must be a positive integer, got {value!r}")
        if self.probe_images > MAX_PROBES:
            raise InvalidOptionError(f"sanity.probe_images must be at most {MAX_PROBES}, got {self.probe_images}")

    def check_options(self, name: str, served: Mapping) -> dict:
        """The options explainer ``name`` is checked with: the served ones made cheaper
        (:func:`reduced_check_options`), then the model config's own check options."""
        return {**reduced_check_options(name, served), **self.explainer_options.get(name, {})}


def check_policy(policy: object) -> str:
    """Raises:
        InvalidOptionError: not one of :data:`POLICIES`.
    """
    if policy not in POLICIES:
        raise InvalidOptionError(f"sanity_policy must be one of {list(POLICIES)}, got {policy!r}")
    return policy


@dataclass(frozen=True)
class ExplainerSanity:
    """One explainer's checks: scores and verdicts, or why they could not be measured."""

    options: Mapping
    scores: SanityScores | None = None
    class_sensitive: bool | None = None
    randomisation_sensitive: bool | None = None
    error: Mapping | None = None
    source: str = "measured"  # "archive": read from the archive (or the load cache), "measured": at this load

    @property
    def verdicts(self) -> dict[str, bool] | None:
        """``{"class_sensitive": bool, "randomisation_sensitive": bool}``, None when not measured."""
        if self.scores is None:
            return None
        return {"class_sensitive": bool(self.class_sensitive), "randomisation_sensitive": bool(self.randomisation_sensitive)}

    @property
    def failed_checks(self) -> tuple[str, ...]:
        verdicts = self.verdicts or {}
        return tuple(check for check in CHECKS if verdicts.get(check) is False)

    @property
    def unavailable(self) -> bool:
        """Whether the explainer cannot explain this model at all (e.g. lrp and a squeeze-excitation gate)."""
        return self.scores is None and (self.error or {}).get("code") == "unsupported_model"

    def describe(self) -> dict:
        """The explainer's entry in the describe API's custom metadata."""
        if self.scores is None:
            entry = {"sanity": None, "error": dict(self.error or {}), "options": dict(self.options)}
            return {**entry, "available": False} if self.unavailable else entry
        scores = self.scores.to_dict()
        sanity = {**self.verdicts, **{key: scores[key] for key in
                                      ("class_map_similarity", "randomisation_similarity", "deletion_auc", "images")}}
        return {"sanity": sanity, "options": dict(self.options), "randomised_layers": scores["randomised_layers"],
                "seconds": scores["seconds"], "cpu_seconds": scores["cpu_seconds"], "source": self.source}


@dataclass(frozen=True)
class SanityReport:
    """Every allowed explainer's checks on the served model."""

    explainers: Mapping[str, ExplainerSanity]
    settings: SanitySettings
    probes: str  # "sample_images" or "generated"
    measure_seconds: float = 0.0  # time spent measuring at this load (0 when every entry was stored)

    def verdicts(self, name: str) -> dict[str, bool] | None:
        entry = self.explainers.get(name)
        return None if entry is None else entry.verdicts

    def failed_checks(self, name: str) -> tuple[str, ...]:
        entry = self.explainers.get(name)
        return () if entry is None else entry.failed_checks

    def warnings(self, name: str) -> list[str]:
        """Human-readable sentences for each failed check of ``name``."""
        entry = self.explainers.get(name)
        if entry is None or entry.scores is None:
            return []
        scores, settings, out = entry.scores, self.settings, []
        if "class_sensitive" in entry.failed_checks:
            out.append(f"{name} failed the class sensitivity check on this model: its maps for the most and the least "
                       f"likely class correlate at {_shown(scores.class_map_similarity)} (threshold "
                       f"{settings.max_class_map_similarity}) over {scores.images} probe images, so the map "
                       "barely depends on the class explained")
        if "randomisation_sensitive" in entry.failed_checks:
            out.append(f"{name} failed the weight-randomisation check on this model: its maps correlate at "
                       f"{_shown(scores.randomisation_similarity)} (threshold {settings.max_randomisation_similarity}) "
                       "with those of the model with randomised weights, so the map barely depends on what the "
                       "model learned")
        return out

    def gauge_values(self) -> list[tuple[str, str, float]]:
        """``(explainer, check, 1.0 pass | 0.0 fail)`` for every measured explainer."""
        return [(name, check, 1.0 if entry.verdicts[check] else 0.0)
                for name, entry in sorted(self.explainers.items()) if entry.verdicts for check in CHECKS]

    def describe(self) -> dict:
        """The handler's custom metadata for ``GET /models/{m}?customized=true``."""
        settings = self.settings
        return {
            "explainers": {name: entry.describe() for name, entry in sorted(self.explainers.items())},
            # Allowed, but unable to explain this model (a request for one is answered 422 unsupported_model).
            "unavailable_explainers": sorted(name for name, entry in self.explainers.items() if entry.unavailable),
            "thresholds": {"max_class_map_similarity": settings.max_class_map_similarity,
                           "max_randomisation_similarity": settings.max_randomisation_similarity},
            "probes": self.probes,
            "measured_at_load_seconds": round(self.measure_seconds, 3),
        }


# --- probes -------------------------------------------------------------------------------------


def generated_probes(count: int, size: tuple[int, int], seed: int = PROBE_SEED) -> torch.Tensor:
    """``count`` synthetic uint8 images ``[count, 3, H, W]``: a filled ellipse or rectangle in one
    colour over a two-colour gradient background, with a little noise.

    A model trained on other pictures still ranks its classes on them, which is all the checks
    need: whether a map changes with the class and with the weights, not whether it is right.
    """
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    rows = torch.linspace(0, 1, height).view(height, 1)
    columns = torch.linspace(0, 1, width).view(1, width)
    images = []
    for _ in range(count):
        start, end, ink = torch.rand(3, 3, generator=generator)
        angle = float(torch.rand(1, generator=generator)) * math.pi
        ramp = (rows * math.sin(angle) + columns * math.cos(angle)).clamp(0, 1)
        image = start.view(3, 1, 1) * (1 - ramp) + end.view(3, 1, 1) * ramp
        centre_y, centre_x, radius_y, radius_x = (0.25 + 0.5 * torch.rand(2, generator=generator)).tolist() + (
            0.12 + 0.2 * torch.rand(2, generator=generator)).tolist()
        dy, dx = (rows - centre_y) / radius_y, (columns - centre_x) / radius_x
        inside = (dy ** 2 + dx ** 2 <= 1) if float(torch.rand(1, generator=generator)) < 0.5 else (
            (dy.abs() <= 1) & (dx.abs() <= 1))
        # The shape's colour kept away from the background's so the shape is visible in any case.
        ink = torch.where((ink - image.mean(dim=(1, 2))).abs() < 0.3, 1 - ink, ink)
        image = torch.where(inside, ink.view(3, 1, 1), image)
        image = image + 0.03 * torch.randn(3, height, width, generator=generator)
        images.append((image.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.stack(images)


def sample_image_files(model_dir: Path | str) -> list[Path]:
    """The archive's sample images, in name order (at most :data:`MAX_PROBES`)."""
    folder = Path(model_dir) / SAMPLE_IMAGES_DIR
    if not folder.is_dir():
        return []
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in SAMPLE_IMAGE_SUFFIXES)
    return files[:MAX_PROBES]


def probe_inputs(model_dir: Path | str | None, preprocessor: Preprocessor, settings: SanitySettings,
                 size: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """``([N, 3, H, W] normalised model inputs, "sample_images" | "generated")``.

    Raises:
        ImageDecodeError: a sample image is not an image.
    """
    files = sample_image_files(model_dir) if model_dir is not None else []
    if files:
        pixels = [preprocessor.pixels(decode_image(path.read_bytes(), max_pixels=MAX_SAMPLE_PIXELS)) for path in files]
        source = SAMPLE_IMAGES_DIR
    else:
        pixels = list(generated_probes(settings.probe_images, size))
        source = "generated"
    return torch.cat([preprocessor.normalise(item) for item in pixels]), source


# --- measuring, storing ------------------------------------------------------------------------


def measure(model: nn.Module, explainers: Sequence[str], served_options: Mapping[str, Mapping], inputs: torch.Tensor,
            settings: SanitySettings, stored: Mapping | None = None, probes: str = "generated",
            at_load: bool = False) -> tuple[SanityReport, dict]:
    """The report for ``explainers``, reusing ``stored`` entries whose fingerprint still matches;
    the rest measured within ``max_load_cpu_seconds`` (``at_load``) or ``max_cpu_seconds``.

    Returns ``(report, document)``: ``document`` is what to store as ``sanity.json``. An explainer
    that cannot explain the model (or fails) gets an error entry instead of verdicts; the rest are
    still measured.
    """
    stored_entries = (stored or {}).get("explainers", {}) if (stored or {}).get("version") == SANITY_VERSION else {}
    weights = model_digest(model)
    records, sources, options_of, stale = {}, {}, {}, []
    for name in explainers:
        options = options_of[name] = settings.check_options(name, served_options.get(name, {}))
        key = fingerprint(weights, name, options, inputs, randomisation_steps=settings.randomisation_steps,
                          deletion_steps=settings.deletion_steps)
        record = stored_entries.get(name)
        fresh = isinstance(record, Mapping) and record.get("fingerprint") == key and (
            # the cost limits are policy, outside the fingerprint: a refusal under other limits is redone
            (record.get("error") or {}).get("code") != "sanity_check_too_costly"
            or record.get("limits") == _limits(settings, at_load))
        if fresh:
            records[name], sources[name] = record, "archive"
        else:
            stale.append((name, key))
    spent = 0.0
    if stale:
        started = time.perf_counter()
        budget = settings.max_load_cpu_seconds if at_load else settings.max_cpu_seconds
        planned = []
        for name, key in stale:
            try:
                evaluations = check_evaluations(model, name, options_of[name], inputs, settings)
            except Exception as error:  # the explainer cannot even be built: _measure_one says why
                evaluations = 0
                logger.debug("cost of %s's checks unknown: %s", name, error)
            planned.append((evaluations, name, key))
        row_seconds = _cpu_seconds_per_row(model, inputs)
        for evaluations, name, key in sorted(planned):
            predicted = evaluations * row_seconds
            if evaluations > settings.max_evaluations or predicted > budget:
                records[name] = _too_costly(name, key, options_of[name], evaluations, predicted, settings, at_load)
            else:
                used = time.process_time()
                records[name] = _measure_one(model, name, options_of[name], inputs, settings, key)
                budget -= time.process_time() - used
            sources[name] = "measured"
        spent = time.perf_counter() - started
    document = {"version": SANITY_VERSION, "explainers": {name: records[name] for name in explainers}}
    entries = {name: _entry(records[name], options_of[name], settings, sources[name]) for name in explainers}
    return SanityReport(entries, settings, probes, spent), document


def check_evaluations(model: nn.Module, name: str, options: Mapping, inputs: torch.Tensor,
                      settings: SanitySettings) -> int:
    """Model evaluations the checks of ``name`` will cost on ``inputs``: per probe, one per stated
    evaluation (at least one, the backward of a gradient method) in each of the explainer's runs
    (top class, least likely class, each evaluated randomisation step), and the deletion curve's."""
    from explainers.evaluation.randomization import cascade_layers
    from explainers.evaluation.sanity import evaluated_steps
    from explainers.registry import create

    height, width = inputs.shape[-2:]
    per_run = max(1, create(name, model, **options).cost(height, width).evaluations)
    runs = 2 + len(evaluated_steps(len(cascade_layers(model, inputs[:1])), settings.randomisation_steps))
    return int(inputs.shape[0]) * (runs * per_run + settings.deletion_steps + 1)


def _cpu_seconds_per_row(model: nn.Module, inputs: torch.Tensor) -> float:
    """CPU time of one forward and backward of the probes, per probe (what one evaluation costs);
    the second of two passes, so the first call's one-off costs do not count. 0 if it fails (the
    explainers' own errors then say why)."""
    from explainers.hygiene import explanation_mode
    from explainers.outputs import logits_of

    try:
        with explanation_mode(model):
            for _ in range(2):
                used = time.process_time()
                batch = inputs.detach().clone().requires_grad_(True)
                logits = logits_of(model(batch))
                torch.autograd.grad(logits.max(dim=1).values.sum(), batch)
    except Exception as error:
        logger.debug("timing a forward and backward of the probes failed: %s", error)
        return 0.0
    return (time.process_time() - used) / max(1, int(inputs.shape[0]))


def _too_costly(name: str, key: str, options: Mapping, evaluations: int, predicted: float,
                settings: SanitySettings, at_load: bool) -> dict:
    limits = _limits(settings, at_load)
    budget = "max_load_cpu_seconds" if at_load else "max_cpu_seconds"
    message = (f"the checks of {name} would cost {evaluations} model evaluations, about {predicted:.1f} CPU-seconds "
               f"(limits: sanity.max_evaluations={settings.max_evaluations}, sanity.{budget}={limits['cpu_seconds']} "
               "for all checks measured at once, cheapest first): measure them when archiving (tools.archive), "
               "lower their check options (sanity.explainer_options) or raise the limits")
    logger.warning("sanity checks of %s not measured: %s", name, message)
    return {"fingerprint": key, "options": _jsonable(options), "limits": limits,
            "error": {"code": "sanity_check_too_costly", "message": message}}


def _limits(settings: SanitySettings, at_load: bool) -> dict:
    budget = settings.max_load_cpu_seconds if at_load else settings.max_cpu_seconds
    return {"max_evaluations": settings.max_evaluations, "cpu_seconds": float(budget)}


def _measure_one(model: nn.Module, name: str, options: Mapping, inputs: torch.Tensor, settings: SanitySettings,
                 key: str) -> dict:
    try:
        scores = sanity_scores(model, name, inputs, options=options, randomisation_steps=settings.randomisation_steps,
                               deletion_steps=settings.deletion_steps)
    except PluginError as error:
        logger.warning("sanity checks of %s could not run: %s", name, error)
        return {"fingerprint": key, "options": _jsonable(options), "error": error.to_dict()}
    except Exception as error:  # a failing explainer must not fail the model's load
        logger.exception("sanity checks of %s failed", name)
        return {"fingerprint": key, "options": _jsonable(options),
                "error": {"code": "explanation_failed", "message": f"{type(error).__name__}: {error}"[:500]}}
    return {"fingerprint": key, "options": _jsonable(options), "scores": scores.to_dict()}


def _entry(record: Mapping, options: Mapping, settings: SanitySettings, source: str) -> ExplainerSanity:
    if "scores" not in record:
        return ExplainerSanity(options, error=record.get("error"), source=source)
    scores = SanityScores.from_dict(record["scores"])
    # NaN (no probe had a ranking to compare) is no evidence of sensitivity: the check fails.
    return ExplainerSanity(options, scores,
                           class_sensitive=scores.class_map_similarity < settings.max_class_map_similarity,
                           randomisation_sensitive=scores.randomisation_similarity < settings.max_randomisation_similarity,
                           source=source)


def read_stored(path: Path | str) -> dict | None:
    """A stored ``sanity.json``, or None when missing or unreadable (then everything is measured)."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning("ignoring unreadable %s: %s", path, error)
        return None
    return document if isinstance(document, dict) else None


def write_stored(path: Path | str, document: Mapping) -> bool:
    """Writes ``document`` atomically (workers of one model may load at once); False if not writable."""
    path = Path(path)
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".sanity-", suffix=".json", delete=False) as handle:
            json.dump(document, handle, indent=1, sort_keys=True)
            handle.write("\n")
        os.replace(handle.name, path)
        return True
    except OSError as error:
        logger.info("sanity results not cached beside the model (%s): they will be measured at the next load", error)
        return False


def load_or_measure(model: nn.Module, serving_settings, model_dir: Path | str | None,
                    at_load: bool = True) -> SanityReport:
    """The report for a model being loaded: stored entries that are still fresh, the rest measured
    now (and written back to ``model_dir/sanity.json`` for the next worker). ``at_load=False``:
    archiving, under the larger CPU budget."""
    settings: SanitySettings = serving_settings.sanity
    # The requests' own preprocessing, so sample photos are resized and cropped as the model expects.
    preprocessor = Preprocessor(size=serving_settings.input_size, mean=serving_settings.mean, std=serving_settings.std,
                                resize=serving_settings.resize, interpolation=serving_settings.interpolation)
    inputs, probes = probe_inputs(model_dir, preprocessor, settings, serving_settings.input_size)
    stored_path = Path(model_dir) / SANITY_FILE if model_dir is not None else None
    stored = read_stored(stored_path) if stored_path is not None else None
    report, document = measure(model, serving_settings.allowed, serving_settings.explainer_options, inputs, settings,
                               stored, probes, at_load)
    if stored_path is not None and report.measure_seconds > 0:
        write_stored(stored_path, document)
    logger.info("sanity checks: %s (%.1f s measured at load)",
                {name: entry.verdicts for name, entry in report.explainers.items()}, report.measure_seconds)
    return report


def _jsonable(options: Mapping) -> dict:
    return json.loads(json.dumps(dict(options), default=repr))


def _shown(value: float) -> str:
    return "undefined" if math.isnan(value) else f"{value:.2f}"


def encode_png(pixels: torch.Tensor) -> bytes:
    """uint8 ``[3, H, W]`` -> PNG bytes (sample images written by the archive tool)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()
