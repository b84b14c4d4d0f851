"""Capturing the output of any module during one forward pass: leaves, containers, activations.

A CAM method weighs the activation of a layer the user names by its dotted module path (``layer4``,
``layer4.1``, ``features.8``). On the traced path containers are not called at all (fx inlines
them) and activation modules are replaced by rule calls, so module hooks would never fire there:
instead the trace gets one :func:`offer` call on the output of every module call, which passes the
value through untouched unless a capture is active in this context and wants that module. On the
fallback path the model's own modules run, and forward hooks feed the same :class:`LayerCapture`.

A captured activation is kept, and the rest of the forward reads a copy of it, so an in-place
operation after the layer (``out += identity``, an in-place activation) cannot change the
activation a CAM weighs; its gradient still flows to it through the copy.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator

import torch
from torch import nn

ALL_LAYERS = None  # LayerCapture(names=ALL_LAYERS) captures every module (default-layer discovery)

_ACTIVE_CAPTURE: contextvars.ContextVar[LayerCapture | None] = contextvars.ContextVar(
    "xai_active_layer_capture", default=None)


class LayerCapture:
    """The outputs of the named modules in one forward pass (the last call of a module reused)."""

    def __init__(self, names: Iterable[str] | None):
        self.names = None if names is ALL_LAYERS else frozenset(names)
        self.activations: dict[str, torch.Tensor] = {}
        # (names, tensor) per module call whose output was captured, in the order the calls ended.
        self.calls: list[tuple[tuple[str, ...], torch.Tensor]] = []

    def offer(self, names: tuple[str, ...], value):
        wanted = names if self.names is None else tuple(name for name in names if name in self.names)
        if not wanted or not isinstance(value, torch.Tensor):
            return value
        for name in wanted:
            self.activations[name] = value
        self.calls.append((wanted, value))
        return value.clone()


def offer(names: tuple[str, ...], value):
    """Traced-graph hook on a module call's output (``names``: every module that call ends)."""
    capture = _ACTIVE_CAPTURE.get()
    return value if capture is None else capture.offer(names, value)


@contextlib.contextmanager
def capturing(capture: LayerCapture, model: nn.Module | None) -> Iterator[None]:
    """``capture`` active for the forward run inside; ``model`` given: its own modules' forward
    hooks feed it too (the fallback path, where the model's modules really run)."""
    token = _ACTIVE_CAPTURE.set(capture)
    handles = []
    try:
        if model is not None:
            for name, module in model.named_modules():
                if name and (capture.names is None or name in capture.names):
                    handles.append(module.register_forward_hook(_hook(capture, name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        _ACTIVE_CAPTURE.reset(token)


def _hook(capture: LayerCapture, name: str):
    def hook(_module, _args, output):
        # Other threads may run this module meanwhile; only this context's forward is captured.
        if _ACTIVE_CAPTURE.get() is not capture:
            return None
        return capture.offer((name,), output)
    return hook
