"""Sanity checks of one explainer on one model, cheap enough to run when a model is archived or loaded.

Two questions a client of a served model should be able to ask about each explainer (Adebayo et
al. 2018; Nie et al. 2018), answered on a handful of probe images:

- **class sensitivity**: does the map change with the class explained? The mean Spearman
  correlation of the maps for each probe's most and least likely class
  (:func:`~explainers.evaluation.sensitivity.class_map_similarity`). Near 1: it does not.
- **weight-randomisation sensitivity**: does the map change when the learned weights are destroyed?
  Layers of a *copy* of the model are randomised cumulatively from the output down (as
  :func:`~explainers.evaluation.randomization.randomization_cascade`), the map of the trained
  model's top class is compared after each evaluated step, and the correlations are averaged over
  steps and probes. Near 1: the map survives the loss of what the model learned.

A deletion AUC of the top-class maps comes along (lower is better), as a faithfulness figure.

The verdicts (thresholds) are policy and live with the serving settings; this module measures.
The served model is only ever explained, as a request would: the randomised models are deep
copies, and random draws (the randomisation, SmoothGrad's noise) come from a forked, seeded RNG so
the scores are reproducible and the caller's random stream is untouched.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import InvalidInputError, InvalidOptionError
from ..registry import create
from ..validation import model_device, validate_inputs
from .maps import importance_map, rank_similarity
from .perturbation import deletion_curve
from .randomization import cascade_layers, randomize_layer
from .sensitivity import class_map_similarity

# Bumped whenever what the scores mean changes, so archived scores of an older version are stale.
SANITY_VERSION = 1
DEFAULT_DELETION_STEPS = 16
# A deep model has dozens of layers; the average over this many evenly spaced steps of its cascade
# (the last one: every layer randomised) follows the full cascade's closely at a fraction of the cost.
DEFAULT_RANDOMISATION_STEPS = 8
DEFAULT_SEED = 0


@dataclass(frozen=True)
class SanityScores:
    """What the checks measured for one explainer.

    Attributes:
        class_map_similarity: mean rank correlation of top-1 and least-likely-class maps (lower:
            more class-sensitive); NaN when no probe gave a defined value.
        randomisation_similarity: mean rank correlation of trained and randomised-model maps over
            the evaluated cascade steps and the probes (lower: more sensitive to the weights).
        deletion_auc: mean deletion AUC of the top-1 maps (lower: more faithful).
        images: probe images measured.
        randomised_layers: the cascade's layers (output side first) whose randomisation was
            evaluated, cumulatively: step k had every layer up to ``randomised_layers[k]`` redrawn.
        seconds: wall time the checks took.
        cpu_seconds: CPU time the process spent meanwhile, every thread counted: what the checks
            cost on an otherwise idle machine, where the wall time also counts other processes' turns.
    """

    class_map_similarity: float
    randomisation_similarity: float
    deletion_auc: float
    images: int
    randomised_layers: tuple[str, ...]
    seconds: float
    cpu_seconds: float = float("nan")

    def to_dict(self) -> dict:
        entry = asdict(self)
        entry["randomised_layers"] = list(self.randomised_layers)
        return {key: _json_number(value) for key, value in entry.items()}

    @classmethod
    def from_dict(cls, entry: Mapping) -> "SanityScores":
        """The inverse of :meth:`to_dict` (``None`` reads back as NaN).

        Raises:
            InvalidInputError: a field missing or of the wrong type.
        """
        try:
            return cls(class_map_similarity=_float(entry["class_map_similarity"]),
                       randomisation_similarity=_float(entry["randomisation_similarity"]),
                       deletion_auc=_float(entry["deletion_auc"]), images=int(entry["images"]),
                       randomised_layers=tuple(str(name) for name in entry["randomised_layers"]),
                       seconds=_float(entry["seconds"]), cpu_seconds=_float(entry.get("cpu_seconds")))
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidInputError(f"not a sanity score entry: {error}") from None


def evaluated_steps(layers: int, steps: int) -> list[int]:
    """Indices of the cascade steps to evaluate: ``steps`` evenly spaced ones ending with the last.

    ``evaluated_steps(7, 8)`` is every step; ``evaluated_steps(50, 4)`` is ``[12, 24, 37, 49]``.

    Raises:
        InvalidOptionError: ``steps`` below 1.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidOptionError(f"randomisation steps must be a positive integer, got {steps!r}")
    if layers <= steps:
        return list(range(layers))
    return sorted({math.ceil((k + 1) * layers / steps) - 1 for k in range(steps)})


def sanity_scores(model: nn.Module, method: str, inputs: torch.Tensor, *, options: Mapping | None = None,
                  randomisation_steps: int = DEFAULT_RANDOMISATION_STEPS,
                  deletion_steps: int = DEFAULT_DELETION_STEPS, seed: int = DEFAULT_SEED) -> SanityScores:
    """Measures explainer ``method`` (with ``options``) on ``model`` over the probe batch ``inputs``.

    Cost: the explainer runs ``2 + len(evaluated steps)`` times over the batch, plus
    ``(deletion_steps + 1)`` forwards per probe and one deep copy of the model.

    Raises:
        UnknownExplainerError, InvalidOptionError: as :func:`explainers.create`.
        InvalidInputError: inputs not a finite float batch ``[B, C, H, W]``.
        UnsupportedModelError: the method cannot explain this model.
    """
    started, started_cpu = time.perf_counter(), time.process_time()
    inputs = validate_inputs(inputs, model).to(model_device(model))
    options = dict(options or {})
    with _seeded(model, seed):
        sensitivity = class_map_similarity(create(method, model, **options), inputs)
        trained = importance_map(sensitivity.top.attributions)
        targets = sensitivity.top.target
        layers, similarities = _randomisation(model, method, options, inputs, targets, trained,
                                              randomisation_steps, seed)
    deletion = deletion_curve(model, inputs, trained, targets.cpu(), steps=min(deletion_steps, trained[0].numel()))
    return SanityScores(class_map_similarity=_nanmean(sensitivity.similarity),
                        randomisation_similarity=_nanmean(similarities),
                        deletion_auc=_nanmean(deletion.auc), images=int(inputs.shape[0]),
                        randomised_layers=layers, seconds=round(time.perf_counter() - started, 3),
                        cpu_seconds=round(time.process_time() - started_cpu, 3))


def model_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state: every parameter's and buffer's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=False).items():
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def fingerprint(weights: str, method: str, options: Mapping, inputs: torch.Tensor, *,
                randomisation_steps: int = DEFAULT_RANDOMISATION_STEPS,
                deletion_steps: int = DEFAULT_DELETION_STEPS, seed: int = DEFAULT_SEED) -> str:
    """A digest of everything :func:`sanity_scores` depends on: the model's state (``weights``, from
    :func:`model_digest`), the method, its options, the probes and the check's own settings.

    Scores stored under another fingerprint are stale: weights retrained, options or probes changed.
    """
    header = {"version": SANITY_VERSION, "weights": weights, "method": method, "options": _canonical(options),
              "randomisation_steps": randomisation_steps, "deletion_steps": deletion_steps, "seed": seed,
              "inputs": [list(inputs.shape), str(inputs.dtype)]}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    digest.update(_tensor_bytes(inputs))
    return digest.hexdigest()


def _randomisation(model: nn.Module, method: str, options: Mapping, inputs: torch.Tensor, targets: torch.Tensor,
                   trained: torch.Tensor, steps: int, seed: int) -> tuple[tuple[str, ...], torch.Tensor]:
    layers = cascade_layers(model, inputs)
    if not layers:
        raise InvalidInputError("the model has no layer with weights to randomise")
    wanted = set(evaluated_steps(len(layers), steps))
    randomised = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    evaluated, similarities = [], []
    for step, names in enumerate(layers):
        randomize_layer(randomised, names, generator)
        if step in wanted:
            attributions = create(method, randomised, **options).explain(inputs, targets).attributions
            similarities.append(rank_similarity(trained, importance_map(attributions)))
            evaluated.append(names[0])
    return tuple(evaluated), torch.stack(similarities)


class _seeded:
    """Forks the RNGs the checks draw from (CPU, and the model's CUDA device) and seeds them."""

    def __init__(self, model: nn.Module, seed: int):
        device = model_device(model)
        self._fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        self._seed = seed

    def __enter__(self):
        self._fork.__enter__()
        torch.manual_seed(self._seed)

    def __exit__(self, *exc_info):
        return self._fork.__exit__(*exc_info)


def _nanmean(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)].double()
    return float(finite.mean()) if finite.numel() else float("nan")


def _json_number(value):
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def _canonical(value):
    if isinstance(value, Mapping):
        return {str(key): _canonical(item) for key, item in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    if isinstance(value, torch.Tensor):
        return hashlib.sha256(_tensor_bytes(value)).hexdigest()
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    # The raw bytes, whatever the dtype (numpy has no bfloat16): a reinterpreting view, not a cast.
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


__all__ = ["DEFAULT_DELETION_STEPS", "DEFAULT_RANDOMISATION_STEPS", "SANITY_VERSION", "SanityScores",
           "evaluated_steps", "fingerprint", "model_digest", "sanity_scores"]
