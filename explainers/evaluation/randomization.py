"""Cascading weight randomisation (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

A map that explains the model must change when the model's learned weights are destroyed. Layers
are randomised cumulatively from the output down to the input, and at each step the map of the
randomised model is compared with the trained model's map for the same image and the same class.
Guided backprop is known to keep its map through the whole cascade; gradients and Grad-CAM lose it.

Choices, stated once:
- A *layer* is a module owning a weight of two or more dimensions (a convolution or a linear map)
  together with the parameter-owning modules that run after it up to the next such layer (its
  normalisation). Order is execution order, observed in one forward pass.
- Randomising redraws every parameter of the layer i.i.d. from a normal distribution with that
  tensor's own mean and standard deviation: the scale of the activations is kept and only the
  learned structure is destroyed. Buffers (batch-norm running statistics) are kept.
- Similarity is Spearman's rank correlation of the importance maps (``Σ_c |a_c|``, absolute values
  as in the paper's main figures; a map the randomisation made constant scores 0, see
  :func:`~explainers.evaluation.maps.rank_similarity`). The signed maps' correlation comes along.
- The randomised models are deep copies; the model passed in is never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidOptionError
from ..hygiene import explanation_mode
from ..registry import create
from ..validation import validate_inputs
from .maps import importance_map, rank_similarity, signed_map


@dataclass(frozen=True)
class RandomizationCascade:
    """Attributes:
        layers: the name of each step's layer, output side first (step k randomises layers[:k + 1]).
        similarity: ``[steps, B]`` rank correlation of trained and randomised importance maps.
        signed_similarity: ``[steps, B]`` the same on the signed maps ``Σ_c a_c``.
        trained_maps: ``[B, H, W]`` importance maps of the trained model.
        step_maps: ``[steps, B, H, W]`` importance maps after each step.
    """

    layers: tuple[str, ...]
    similarity: torch.Tensor
    signed_similarity: torch.Tensor
    trained_maps: torch.Tensor
    step_maps: torch.Tensor

    @property
    def randomized_maps(self) -> torch.Tensor:
        """``[B, H, W]`` importance maps with every layer randomised."""
        return self.step_maps[-1]


def cascade_layers(model: nn.Module, example: torch.Tensor) -> list[tuple[str, ...]]:
    """Module names grouped into layers, output side first (see the module notes).

    Raises:
        InvalidInputError: ``example`` is not a valid input batch for the model.
    """
    example = validate_inputs(example, model)
    owners = {name: module for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))}
    executed: list[str] = []
    handles = [module.register_forward_pre_hook(lambda _m, _a, name=name: executed.append(name))
               for name, module in owners.items()]
    try:
        with explanation_mode(model), torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for name in dict.fromkeys(executed):  # first execution of each module, in order
        starts_layer = any(parameter.dim() >= 2 for parameter in owners[name].parameters(recurse=False))
        if starts_layer or not groups:
            groups.append([name])
        else:
            groups[-1].append(name)
    return [tuple(group) for group in reversed(groups)]


def randomize_layer(model: nn.Module, names: tuple[str, ...], generator: torch.Generator) -> None:
    """Redraws, in place, the parameters of the modules ``names`` of ``model`` (a copy, by contract)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            for parameter in modules[name].parameters(recurse=False):
                trained = parameter.detach().double().cpu()
                std = float(trained.std(unbiased=False)) if trained.numel() > 1 else 0.0
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                parameter.copy_((float(trained.mean()) + std * noise).to(parameter.dtype))


def randomization_cascade(model: nn.Module, method: str, inputs: torch.Tensor, targets: torch.Tensor, *,
                          options: Mapping | None = None, seed: int = 0,
                          max_steps: int | None = None) -> RandomizationCascade:
    """The cascade for explainer ``method`` (with ``options``) on ``inputs``, explaining ``targets``.

    The targets are the trained model's classes (e.g. its top-1) and stay fixed along the cascade:
    the question is whether the map *of that class* survives the loss of the weights.

    ``max_steps``: for deep models (a ResNet-50 has 54 layers), layers are still randomised one by
    one from the top, but maps are compared only after at most this many of them, evenly spaced,
    the first and the last included; ``layers`` then names the last layer randomised at each step.

    Raises:
        UnknownExplainerError, InvalidOptionError: as :func:`explainers.create`; a bad ``max_steps``.
        InvalidInputError, InvalidTargetError: as :meth:`Explainer.explain`.
    """
    options = dict(options or {})
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise InvalidOptionError(f"max_steps must be a positive integer or None, got {max_steps!r}")
    inputs = validate_inputs(inputs, model)
    trained = create(method, model, **options).explain(inputs, targets).attributions
    layers = cascade_layers(model, inputs)
    compared = _compared_steps(len(layers), max_steps)
    randomized = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    trained_maps = importance_map(trained)
    similarities, signed_similarities, step_maps = [], [], []
    for step, names in enumerate(layers):
        randomize_layer(randomized, names, generator)
        if step not in compared:
            continue
        attributions = create(method, randomized, **options).explain(inputs, targets).attributions
        step_maps.append(importance_map(attributions))
        similarities.append(rank_similarity(trained_maps, step_maps[-1]))
        signed_similarities.append(rank_similarity(signed_map(trained), signed_map(attributions)))
    return RandomizationCascade(tuple(layers[step][0] for step in sorted(compared)), torch.stack(similarities),
                                torch.stack(signed_similarities), trained_maps, torch.stack(step_maps))


def _compared_steps(count: int, max_steps: int | None) -> set[int]:
    if max_steps is None or count <= max_steps:
        return set(range(count))
    if max_steps == 1:
        return {count - 1}
    return {round(index * (count - 1) / (max_steps - 1)) for index in range(max_steps)}
