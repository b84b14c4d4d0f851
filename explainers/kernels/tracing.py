"""The traced rule model: ``torch.fx`` rewrites every ReLU call site to a recording one.

The traced module shares the model's submodules, so weights, buffers and training flags are the
model's own; only the call graph is new.
"""

from __future__ import annotations

import operator
import threading

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .batchnorm import BATCH_NORMS, eval_batch_norm
from .rules import rule_relu, rule_relu_

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
        if node.op == "call_module" and type(modules.get(node.target)) in BATCH_NORMS and len(node.args) == 1 and not node.kwargs:
            with graph.inserting_before(node):
                module_node = graph.get_attr(node.target)
                replacement = graph.call_function(eval_batch_norm, (module_node, node.args[0]))
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
    graph.lint()
    graph_module.recompile()
    return graph_module
