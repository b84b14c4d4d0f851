"""Name registry of explainers: built-in and third-party ones alike."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from torch import nn

from .base import Explainer
from .errors import DuplicateExplainerError, InvalidOptionError, UnknownExplainerError

_registry: dict[str, type[Explainer]] = {}


def register(name: str) -> Callable[[type[Explainer]], type[Explainer]]:
    """Class decorator registering an :class:`Explainer` subclass under ``name``.

    Raises:
        DuplicateExplainerError: ``name`` is taken.
        TypeError: the class is not a concrete :class:`Explainer` subclass.
        ValueError: ``name`` is empty or not a string.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"explainer name must be a non-empty string without surrounding spaces, got {name!r}")

    def decorate(cls: type[Explainer]) -> type[Explainer]:
        if not (inspect.isclass(cls) and issubclass(cls, Explainer)) or inspect.isabstract(cls):
            raise TypeError(f"{cls!r} must be a concrete subclass of explainers.Explainer (implement attribute())")
        if name in _registry:
            raise DuplicateExplainerError(f"an explainer named {name!r} is already registered ({_registry[name].__qualname__})")
        cls.name = name
        _registry[name] = cls
        return cls

    return decorate


def available() -> list[str]:
    """Sorted names of all registered explainers."""
    return sorted(_registry)


def explainer_class(name: str) -> type[Explainer]:
    """Raises: UnknownExplainerError listing the available names."""
    try:
        return _registry[name]
    except (KeyError, TypeError):
        raise UnknownExplainerError(f"unknown explainer {name!r}; available: {', '.join(available())}") from None


@functools.lru_cache(maxsize=None)
def _keyword_options(cls: type[Explainer]) -> frozenset[str]:
    """The keyword-only constructor arguments of ``cls`` (inspecting a signature costs ~0.2 ms)."""
    return frozenset(
        parameter.name
        for parameter in inspect.signature(cls.__init__).parameters.values()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    )


def create(name: str, model: nn.Module, **options) -> Explainer:
    """An explainer ``name`` for ``model`` with its keyword ``options``.

    Raises:
        UnknownExplainerError: no explainer of that name.
        InvalidOptionError: an option the explainer does not take, or a bad value.
    """
    cls = explainer_class(name)
    accepted = _keyword_options(cls)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise InvalidOptionError(
            f"{name} does not take option(s) {unknown}; it takes {sorted(accepted) or 'none'}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return cls(model, **options)
