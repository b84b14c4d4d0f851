"""Backward rules at activations: plain gradient, Guided Backpropagation and DeconvNet.

One forward pass records, at each activation call (``activations.py`` lists the kinds), the
autograd node of that call (ATen's own, e.g. ``ReluBackward0`` or ``GeluBackward0``, whose
backward is ``phi'(f) · R``). Every backward over that same graph then applies the rule chosen at
backward time, so a single forward serves several methods (each runs its own backward with
``retain_graph``):

* ``GRADIENT``  (saliency):         ``phi'(f) · R``          the node as it is: no hook at all
* ``GUIDED``    (guided backprop):  ``phi'(f) · max(R, 0)``  a pre-hook clamps R, the node multiplies
* ``DECONV``    (DeconvNet):        ``max(R, 0)``            a post-hook replaces the node's result

With R the gradient arriving at an activation's output and f its input (DESIGN.md §2). For ReLU,
``phi'(f) = 1[f>0]`` and these are Springenberg et al.'s rules exactly. For smooth activations
(GELU, SiLU, ...) guided backprop keeps the activation's own local slope, which may be negative or
above one, and drops the negative evidence arriving from above, the part of the rule that makes it
"guided"; DeconvNet ignores the forward pass at activations whatever their shape. The hooks sit on
the nodes of one forward's own graph for the length of one backward, so nothing is ever attached
to the model, and concurrent explanations never see each other's rules. The rule touches only the
gradient flowing back through the ReLU itself; autograd adds the gradient of any other branch
that reads the ReLU's input afterwards, unclamped.

The plain gradient therefore costs exactly what autograd costs, and the guided rule one clamp per
ReLU (measured on a ResNet-50 shape: 1-3 % over the plain-gradient floor, where the earlier
Python ``autograd.Function`` per ReLU cost 6-12 %).

How the ReLU nodes of a forward are found, without touching the user's model:

* ``torch.fx`` traces the model and every ReLU call site (``nn.ReLU`` modules, in-place or reused,
  ``F.relu``, ``torch.relu``, ``Tensor.relu``, ``relu_`` forms) is replaced by ``rule_relu``,
  which runs ATen's ReLU out of place and records its node. The traced module shares the model's
  submodules, so weights, buffers and training flags are the model's own.
* A model fx cannot trace runs its own ``forward`` under a thread-local ``TorchFunctionMode`` that
  sends the same ReLU calls to ``rule_relu``. It is slower (every torch call passes through
  Python), but exact. (Walking the autograd graph of the model's own forward for its ReLU nodes
  would be as fast as the trace, but the model's own in-place ReLUs may leave a graph autograd
  cannot run: two in-place ReLUs in a row invalidate the first one's saved output.)
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
from collections.abc import Iterator

import torch
from torch import nn

from .activations import MODULE_KINDS, OUT_OF_PLACE, module_activation


class BackwardRule(enum.Enum):
    GRADIENT = "gradient"
    GUIDED = "guided"
    DECONV = "deconv"


class RuleSelector:
    """The activation nodes of one forward pass, and the rule a backward over them applies.

    One selector belongs to one forward pass, so concurrent explanations never share one.
    """

    __slots__ = ("rule", "nodes", "sites")

    def __init__(self, rule: BackwardRule = BackwardRule.GRADIENT):
        self.rule = rule
        self.nodes: list = []  # the activations' autograd nodes, in forward order
        self.sites: dict[str, int] = {}  # activation kind -> calls recorded

    def record(self, kind: str, node) -> None:
        self.nodes.append(node)
        self.sites[kind] = self.sites.get(kind, 0) + 1

    @contextlib.contextmanager
    def applying(self, rule: BackwardRule) -> Iterator[None]:
        """Hooks realising ``rule`` on every recorded ReLU node, for one backward pass."""
        self.rule = rule
        if rule is BackwardRule.GRADIENT:
            yield
            return
        handles = []
        try:
            for node in self.nodes:
                if rule is BackwardRule.GUIDED:
                    handles.append(node.register_prehook(_clamp_incoming))
                else:
                    handles.append(node.register_hook(_pass_clamped_incoming))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _clamp_incoming(grad_outputs):
    """Guided rule, before the node's own mask: R -> 1[R>0]·R."""
    (incoming,) = grad_outputs
    return None if incoming is None else (incoming.clamp(min=0),)


def _pass_clamped_incoming(grad_inputs, grad_outputs):
    """DeconvNet rule: the node's result for its input replaced by max(R, 0) (the forward ignored).

    PReLU's node also returns its weight's gradient, which no explanation reads: left as it is.
    """
    (incoming,) = grad_outputs
    if incoming is None or grad_inputs[0] is None:
        return None
    return (incoming.clamp(min=0), *grad_inputs[1:])


# Set only while a forward pass records, in the caller's own context (thread-safe).
_ACTIVE_SELECTOR: contextvars.ContextVar[RuleSelector | None] = contextvars.ContextVar(
    "xai_active_rule_selector", default=None
)


def recorded(output: torch.Tensor, kind: str) -> torch.Tensor:
    """``output`` of an activation call, its autograd node recorded for the forward in progress."""
    selector = _ACTIVE_SELECTOR.get()
    if selector is not None and output.grad_fn is not None:
        selector.record(kind, output.grad_fn)
    return output


def rule_relu(inputs: torch.Tensor) -> torch.Tensor:
    """ATen's ReLU, out of place, its autograd node recorded for the forward pass in progress.

    Out of place also where the model wrote an in-place ReLU: the traced graph points every later
    reader at this output, and the input stays intact for whatever else saved it.
    """
    return recorded(torch.relu(inputs), "relu")


def rule_activation(kind: str, function: str, *args, **kwargs) -> torch.Tensor:
    """The out-of-place activation ``OUT_OF_PLACE[function](*args, **kwargs)``, recorded as ``kind``.

    The function goes by name: a traced graph can pass strings to a call, not function objects.
    """
    return recorded(OUT_OF_PLACE[function](*args, **kwargs), kind)


def rule_module_activation(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """What activation ``module`` computes, out of place, recorded under its kind."""
    return recorded(module_activation(module, inputs), MODULE_KINDS[type(module)])


def rule_relu_(inputs: torch.Tensor) -> torch.Tensor:
    """ATen's in-place ReLU, its node recorded; for call sites where mutating the input is safe.

    The trace uses it only where the model itself wrote an in-place ReLU on a fresh tensor no
    earlier op saved (see :func:`_mutation_is_safe`). A leaf that requires grad or a view cannot
    take it (autograd forbids the first and hides the node of the second), so they get the
    out-of-place ReLU.
    """
    if inputs.requires_grad and (inputs.is_leaf or inputs._is_view()):
        return rule_relu(inputs)
    return recorded(torch.relu_(inputs), "relu")


@contextlib.contextmanager
def selecting_rules(selector: RuleSelector) -> Iterator[None]:
    token = _ACTIVE_SELECTOR.set(selector)
    try:
        yield
    finally:
        _ACTIVE_SELECTOR.reset(token)


def active_selector() -> RuleSelector | None:
    """The selector of the forward pass recording in this context, if any."""
    return _ACTIVE_SELECTOR.get()
