"""Layer sites: where a relevance rule (LRP) replaces the gradient of a whole layer, for one backward.

A layer site is one call of a convolution or linear module (with the eval batch norm that directly
follows it merged in), a batch norm that follows no such layer, a normalisation by the input's own
statistics (instance, group and layer norm modules), or an elementwise activation whose gradient is
not its relevance rule. In the traced rule model built with layer sites
(``trace_rule_model(model, layer_sites=True)``), the output of every site passes through
:func:`layer_site`, which wraps it in :class:`_Site`: an identity in the forward pass whose
backward is the plain gradient (the layer's own autograd nodes run as they are) unless a
backward over the :class:`LayerSiteState` of this forward applies rules. Then the site's backward
hands nothing to the layer's own nodes (they skip their work: no gradient reaches them) and
returns what the rule computes for the layer's input directly.

Relevance travels as ``input x modified gradient``: the relevance of any tensor ``t`` is ``t * g_t``
where ``g_t`` is what the backward carries, so every node between sites (ReLU, max and average
pooling, additions, reshapes, concatenation) keeps its plain gradient, which is exactly its LRP rule
(ReLU and max pooling pass relevance to the winners, an addition splits it in proportion to the
summands, average pooling in proportion to the inputs). A site's rule receives ``R_z = z * g_z`` at
its output and returns ``g_x`` with ``x * g_x = R_x``, or, for first-layer rules that are not of that
form (flat, w^2, z^B), the relevance ``R_x`` itself (:meth:`LayerSiteState.add_direct`).

The state belongs to one forward pass (one :class:`ForwardRecord`): concurrent explanations never
share one, nothing is attached to the model, and the rules are set only for the length of one
backward (:meth:`LayerSiteState.applying`).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

# Site kinds.
CONVOLUTION = "convolution"
LINEAR = "linear"
BATCH_NORM = "batch_norm"
ACTIVATION = "activation"
NORMALISATION = "normalisation"

LAYER_MODULES: dict[type, str] = {nn.Conv1d: CONVOLUTION, nn.Conv2d: CONVOLUTION, nn.Conv3d: CONVOLUTION,
                                  nn.Linear: LINEAR}
# Normalisations by the input's own statistics: a linear map once the scale is held constant.
NORMALISATION_MODULES = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class SiteCall:
    """One call of a site in one forward: what a rule needs besides the tensors."""

    index: int  # the trace's site number: unique per call site of the traced graph
    kind: str
    layer: nn.Module | None  # the convolution, linear or normalisation module (None: lone batch norm, activation)
    batch_norm: nn.Module | None  # the eval batch norm merged into the layer, or the lone batch norm
    activation: str | None = None  # the activation kind of an activation site


# A site's rule: (site call, layer input x, site output z, gradient at z) -> ("gradient", g_x) or ("relevance", R_x).
SiteRule = Callable[[SiteCall, torch.Tensor, torch.Tensor, torch.Tensor], tuple[str, torch.Tensor]]


class LayerSiteState:
    """The sites one forward pass recorded, and the rule a backward over them applies (if any)."""

    def __init__(self):
        self.calls: dict[int, SiteCall] = {}
        self.rule: SiteRule | None = None
        self.direct: torch.Tensor | None = None  # relevance first-layer rules returned directly
        self._ref = weakref.ref(self)

    def record(self, call: SiteCall) -> None:
        self.calls[call.index] = call

    def add_direct(self, relevance: torch.Tensor) -> None:
        self.direct = relevance if self.direct is None else self.direct + relevance

    @contextlib.contextmanager
    def applying(self, rule: SiteRule) -> Iterator[None]:
        """``rule`` at every site for the backward run inside; the plain gradient again after."""
        if self.rule is not None:
            raise RuntimeError("a relevance backward is already running over this forward pass")
        self.rule, self.direct = rule, None
        try:
            yield
        finally:
            self.rule = None


class _Site(torch.autograd.Function):
    """Identity on the site's output; its backward is the gradient, or the active rule's result."""

    @staticmethod
    def forward(ctx, state_ref, index, output, inputs):
        ctx.state_ref, ctx.index = state_ref, index
        ctx.save_for_backward(output, inputs)
        ctx.set_materialize_grads(False)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        state = ctx.state_ref()  # a weak reference: the graph must not keep the state (nor a cycle) alive
        if state is None or state.rule is None or grad is None:
            return None, None, grad, None
        output, inputs = ctx.saved_tensors
        form, value = state.rule(state.calls[ctx.index], inputs, output, grad)
        if form == "relevance":
            state.add_direct(value)
            return None, None, None, torch.zeros_like(inputs) if ctx.needs_input_grad[3] else None
        if form == "output_gradient":  # a rule that only rescales the gradient at the output (epsilon)
            return None, None, value, None
        return None, None, None, value


SITE_NODE_NAME = "_SiteBackward"


def is_site_node(node) -> bool:
    return type(node).__name__ == SITE_NODE_NAME


_ACTIVE_STATE: contextvars.ContextVar[LayerSiteState | None] = contextvars.ContextVar(
    "xai_active_layer_sites", default=None)


@contextlib.contextmanager
def recording_sites(state: LayerSiteState | None) -> Iterator[None]:
    token = _ACTIVE_STATE.set(state)
    try:
        yield
    finally:
        _ACTIVE_STATE.reset(token)


def layer_site(index: int, kind: str, layer, batch_norm, output, inputs, activation: str | None = None):
    """Traced-graph call after every site: ``output`` unchanged, wrapped in a :class:`_Site` while a
    forward records sites in this context (otherwise the value itself, at no cost)."""
    state = _ACTIVE_STATE.get()
    if state is None or not isinstance(output, torch.Tensor) or not output.requires_grad:
        return output
    state.record(SiteCall(index, kind, layer, batch_norm, activation))
    return _Site.apply(state._ref, index, output, inputs)
