"""Backward rules at ReLUs: plain gradient, Guided Backpropagation and DeconvNet.

One forward pass records, at each ReLU, the autograd node of that ReLU call (ATen's own
``ReluBackward0``, which keeps the output, whose sign is the mask ``f > 0``). Every backward over
that same graph then applies the rule chosen at backward time, so a single forward serves several
methods (each runs its own backward with ``retain_graph``):

* ``GRADIENT``  (saliency):         ``1[f>0] · R``          the node as it is: no hook at all
* ``GUIDED``    (guided backprop):  ``1[f>0] · 1[R>0] · R``  a pre-hook clamps R, the node masks
* ``DECONV``    (DeconvNet):        ``1[R>0] · R``          a post-hook replaces the node's result

With R the gradient arriving at a ReLU's output and f its input (DESIGN.md §2). The hooks sit on
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
import operator
import threading
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


class BackwardRule(enum.Enum):
    GRADIENT = "gradient"
    GUIDED = "guided"
    DECONV = "deconv"


class RuleSelector:
    """The ReLU nodes of one forward pass, and the rule a backward over them applies.

    One selector belongs to one forward pass, so concurrent explanations never share one.
    """

    __slots__ = ("rule", "nodes")

    def __init__(self, rule: BackwardRule = BackwardRule.GRADIENT):
        self.rule = rule
        self.nodes: list = []  # autograd ReluBackward0 nodes, in forward order

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
    """DeconvNet rule: the node's masked result replaced by 1[R>0]·R (the forward mask ignored)."""
    (incoming,) = grad_outputs
    if incoming is None or grad_inputs[0] is None:
        return None
    return (incoming.clamp(min=0),)


# Set only while a forward pass records, in the caller's own context (thread-safe).
_active_selector: contextvars.ContextVar[RuleSelector | None] = contextvars.ContextVar(
    "xai_active_rule_selector", default=None
)


def rule_relu(inputs: torch.Tensor) -> torch.Tensor:
    """ATen's ReLU, out of place, its autograd node recorded for the forward pass in progress.

    Out of place also where the model wrote an in-place ReLU: the traced graph points every later
    reader at this output, and the input stays intact for whatever else saved it.
    """
    output = torch.relu(inputs)
    selector = _active_selector.get()
    if selector is not None and output.grad_fn is not None:
        selector.nodes.append(output.grad_fn)
    return output


def rule_relu_(inputs: torch.Tensor) -> torch.Tensor:
    """ATen's in-place ReLU, its node recorded; for call sites where mutating the input is safe.

    The trace uses it only where the model itself wrote an in-place ReLU on a fresh tensor no
    earlier op saved (see :func:`_mutation_is_safe`). A leaf that requires grad or a view cannot
    take it (autograd forbids the first and hides the node of the second), so they get the
    out-of-place ReLU.
    """
    if inputs.requires_grad and (inputs.is_leaf or inputs._is_view()):
        return rule_relu(inputs)
    output = torch.relu_(inputs)
    selector = _active_selector.get()
    if selector is not None and output.grad_fn is not None:
        selector.nodes.append(output.grad_fn)
    return output


@contextlib.contextmanager
def selecting_rules(selector: RuleSelector) -> Iterator[None]:
    token = _active_selector.set(selector)
    try:
        yield
    finally:
        _active_selector.reset(token)


# --- fx rewrite -------------------------------------------------------------------------------

_RELU_FUNCTIONS = {F.relu, torch.relu}
_INPLACE_RELU_FUNCTIONS = {torch.relu_, F.relu_}


def _relu_call_kind(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """'out_of_place', 'inplace' or None for a node that is not a ReLU call."""
    if node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU:
        return "inplace" if modules[node.target].inplace else "out_of_place"
    if node.op == "call_function":
        if node.target in _INPLACE_RELU_FUNCTIONS:
            return "inplace"
        if node.target in _RELU_FUNCTIONS:
            inplace = node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False)
            return "inplace" if inplace else "out_of_place"
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "inplace" if node.target == "relu_" else "out_of_place"
    return None


def _relu_input(node: torch.fx.Node) -> torch.fx.Node:
    return node.args[0] if node.args else node.kwargs["input"]


# Producers whose output no backward keeps: a ReLU may overwrite it without autograd noticing.
_UNSAVED_OUTPUT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
                           nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_UNSAVED_OUTPUT_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_UNSAVED_OUTPUT_METHODS = {"add", "add_"}


def _mutation_is_safe(source: torch.fx.Node, relu: torch.fx.Node, modules: dict[str, nn.Module],
                      position: dict[torch.fx.Node, int]) -> bool:
    """Whether the in-place ReLU ``relu`` may really overwrite ``source``, as the model wrote it.

    Only when ``source`` comes from an op that keeps no reference to its output for backward
    (convolution, linear, batch norm, addition) and nothing reads it before the ReLU: then no
    saved tensor changes under autograd, and the forward allocates what the model's own does.
    """
    if any(position[reader] < position[relu] for reader in source.users if reader is not relu):
        return False
    if source.op == "call_module":
        return type(modules.get(source.target)) in _UNSAVED_OUTPUT_MODULES
    if source.op == "call_function":
        return source.target in _UNSAVED_OUTPUT_FUNCTIONS
    if source.op == "call_method":
        return source.target in _UNSAVED_OUTPUT_METHODS
    return False


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def eval_batch_norm(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """An eval-mode batch norm as the affine map it is: ``x · scale + shift``, per channel.

    Equal to the module's own forward (up to rounding), but its backward is one multiplication:
    ATen's batch-norm backward costs 5-8x more (measured 18 ms against 2.4 ms on [8, 256, 56, 56]),
    about 5 % of a ResNet-50 input gradient. Scale and shift come from the module's current
    statistics (cached until one changes), outside autograd: explanations differentiate with
    respect to inputs and activations, never weights. Anything else (training mode, batch statistics,
    hooks on the module, another dtype) runs the module itself.
    """
    if (module.training or module.running_mean is None or module.running_var is None
            or inputs.dtype != module.running_var.dtype or inputs.dim() < 2
            or module._forward_hooks or module._forward_pre_hooks
            or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks):
        return module(inputs)
    scale, shift = _batch_norm_affine(module)
    shape = (1, -1) + (1,) * (inputs.dim() - 2)
    return torch.addcmul(shift.view(shape), inputs, scale.view(shape))


# module -> (source tensors, their versions, eps, scale, shift): computing scale and shift costs
# five small kernels per batch norm and forward (about 8 ms of a ResNet-50 forward).
_affine_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _batch_norm_affine(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of an eval batch norm, recomputed whenever a statistic or weight changed.

    A tensor's ``_version`` counts its in-place changes (``load_state_dict``, optimiser steps,
    running-statistic updates), and a replaced tensor is another object: either invalidates.
    """
    sources = (module.running_var, module.running_mean, module.weight, module.bias)
    versions = tuple(-1 if tensor is None else tensor._version for tensor in sources)
    cached = _affine_cache.get(module)
    if (cached is not None and cached[1] == versions and cached[2] == module.eps
            and all(a is b for a, b in zip(cached[0], sources))):
        return cached[3], cached[4]
    with torch.inference_mode(False), torch.no_grad():
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        shift = -module.running_mean * scale
        if module.bias is not None:
            shift = shift + module.bias
    _affine_cache[module] = (sources, versions, module.eps, scale, shift)
    return scale, shift


class _ThreadConfinedTracer(torch.fx.Tracer):
    """A tracer that leaves every other thread alone.

    While it traces, ``torch.fx`` patches ``nn.Module.__call__`` and ``__getattr__`` process-wide:
    a module called meanwhile from another thread (plain inference, training, another explanation)
    would be routed into this trace and fail. Calls and attribute reads from any thread but the
    tracing one run as if nothing were patched.
    """

    def __init__(self):
        super().__init__()
        self._thread = threading.get_ident()

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    tracer = _ThreadConfinedTracer()
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def trace_rule_model(model: nn.Module) -> torch.fx.GraphModule:
    """Trace ``model`` and route every ReLU call site through :func:`rule_relu`.

    Every later reader of an in-place ReLU's input is pointed at the ReLU's output, which is what
    it would have read after the mutation. The ReLU stays in place only where that is safe for
    autograd (:func:`_mutation_is_safe`, e.g. on a batch norm's or a residual sum's output, as in
    ResNets); elsewhere it becomes out-of-place, so a model whose own in-place ReLUs autograd
    could not differentiate (two in a row) is still explained exactly.

    Batch norms become :func:`eval_batch_norm` calls (the module itself whenever it is not a plain
    eval-mode batch norm at call time).

    Raises:
        Exception: whatever ``torch.fx`` raises for a model it cannot trace.
    """
    graph_module = _symbolic_trace(model)
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    position = {node: index for index, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        kind = _relu_call_kind(node, modules)
        if kind is None:
            continue
        source = _relu_input(node)
        in_place = kind == "inplace" and _mutation_is_safe(source, node, modules, position)
        with graph.inserting_after(node):
            replacement = graph.call_function(rule_relu_ if in_place else rule_relu, (source,))
        position[replacement] = position[node]
        node.replace_all_uses_with(replacement)
        if kind == "inplace":
            for reader in list(source.users):
                if position.get(reader, -1) > position[node]:
                    reader.replace_input_with(source, replacement)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "call_module" and type(modules.get(node.target)) in _BATCH_NORMS and len(node.args) == 1 and not node.kwargs:
            with graph.inserting_before(node):
                module_node = graph.get_attr(node.target)
                replacement = graph.call_function(eval_batch_norm, (module_node, node.args[0]))
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
    graph.lint()
    graph_module.recompile()
    return graph_module


# --- fallback for models fx cannot trace -----------------------------------------------------

_OUT_OF_PLACE_RELUS = {F.relu, torch.relu, torch.Tensor.relu}
_IN_PLACE_RELUS = {torch.relu_, F.relu_, torch.Tensor.relu_}


class _ReluRuleMode(TorchFunctionMode):
    """Sends every ReLU call made during a forward to :func:`rule_relu` (this thread only)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _OUT_OF_PLACE_RELUS or func in _IN_PLACE_RELUS:
            inputs = args[0] if args else kwargs["input"]
            inplace = func in _IN_PLACE_RELUS or kwargs.get("inplace", args[1] if len(args) > 1 else False)
            output = rule_relu(inputs)
            if not inplace:
                return output
            # Keep in-place semantics: the caller's tensor now holds the output, with its history.
            return inputs.copy_(output)
        return func(*args, **kwargs)


class _ModeRuleModel(nn.Module):
    """Runs the model's own forward with every ReLU call intercepted (and so recorded)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        # Not registered as a submodule: this wrapper must never own or move the model.
        object.__setattr__(self, "wrapped", model)

    def forward(self, *args, **kwargs):
        with _ReluRuleMode():
            return self.wrapped(*args, **kwargs)


# --- cache ------------------------------------------------------------------------------------

RuleModel = Callable[..., torch.Tensor]

_cache_lock = threading.Lock()
_rule_models: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], RuleModel]] = (
    weakref.WeakKeyDictionary()
)


def _structure_key(model: nn.Module) -> tuple[int, ...]:
    # Replacing a submodule after tracing changes this key, so a stale trace is never reused.
    return tuple(id(module) for module in model.modules())


def rule_model_for(model: nn.Module, example: torch.Tensor) -> RuleModel:
    """The cached rule model of ``model`` (traced when possible, else the intercepting fallback).

    The first build checks the traced model against the model on ``example``: a trace whose output
    disagrees (Python control flow fx froze) or that would lose a custom ``autograd.Function``
    backward is discarded for the fallback.
    """
    key = _structure_key(model)
    with _cache_lock:
        cached = _rule_models.get(model)
        if cached is not None and cached[0] == key:
            return cached[1]
        rule_model = _build_rule_model(model, example)
        _rule_models[model] = (key, rule_model)
        return rule_model


def _uses_custom_autograd_functions(output: torch.Tensor) -> bool:
    """Whether the autograd graph behind ``output`` holds a Python ``autograd.Function``.

    fx traces through ``Function.apply`` into its forward and silently drops its custom backward,
    so a model using one must run its own forward (the fallback) to keep that backward.
    """
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _build_rule_model(model: nn.Module, example: torch.Tensor) -> RuleModel:
    try:
        traced = trace_rule_model(model)
    except Exception:  # fx raises many types for untraceable code; the fallback is always exact
        return _ModeRuleModel(model)
    with torch.enable_grad():
        expected = model(example.detach().requires_grad_(True))
    with torch.no_grad():
        observed = traced(example)
    if (
        isinstance(expected, torch.Tensor)
        and isinstance(observed, torch.Tensor)
        and expected.shape == observed.shape
        and torch.allclose(expected.detach(), observed, rtol=1e-4, atol=1e-5)
        and not _uses_custom_autograd_functions(expected)
    ):
        return traced
    return _ModeRuleModel(model)


def uses_traced_rules(model: nn.Module) -> bool:
    """Whether ``model``'s cached rule model is the fast traced one (for diagnostics and tests)."""
    cached = _rule_models.get(model)
    return cached is not None and isinstance(cached[1], torch.fx.GraphModule)
