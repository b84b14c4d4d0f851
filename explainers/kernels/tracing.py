"""The traced rule model: ``torch.fx`` rewrites every activation call site to a recording one.

The traced module shares the model's submodules, so weights, buffers and training flags are the
model's own; only the call graph is new.
"""

from __future__ import annotations

import inspect
import operator
import threading

import torch
import torch.fx
from torch import nn

from ..errors import UnsupportedModelError
from .activations import FUNCTION_KINDS, METHOD_KINDS, MODULE_KINDS, refine_kind, split_inplace
from .batchnorm import BATCH_NORMS, eval_batch_norm
from .capture import offer
from .layer_sites import ACTIVATION, BATCH_NORM, LAYER_MODULES, NORMALISATION, NORMALISATION_MODULES, layer_site
from .rules import rule_activation, rule_module_activation, rule_relu, rule_relu_

def _activation_call(node: torch.fx.Node, modules: dict[str, nn.Module]):
    """``(kind, out-of-place function's name or None for a module, args, kwargs, in place)`` of an
    activation call node, or None for any other node."""
    if node.op == "call_module":
        module = modules.get(node.target)
        kind = MODULE_KINDS.get(type(module))
        if kind is None:
            return None
        return kind, None, node.args, dict(node.kwargs), bool(getattr(module, "inplace", False))
    if node.op == "call_function" and node.target in FUNCTION_KINDS:
        function, inplace = FUNCTION_KINDS[node.target]
        args, kwargs, inplace_flag = split_inplace(node.target, node.args, node.kwargs)
        return refine_kind(function, args, kwargs), function, args, kwargs, inplace or inplace_flag
    if node.op == "call_method" and node.target in METHOD_KINDS:
        function, inplace = METHOD_KINDS[node.target]
        return function, function, node.args, dict(node.kwargs), inplace
    return None


def _call_input(node: torch.fx.Node) -> torch.fx.Node:
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
    A layer capture in between hands on the value itself, or a copy when it captures (which the
    ReLU may overwrite too): it is looked through.
    """
    if any(position[reader] < position[relu] for reader in source.users if reader is not relu):
        return False
    while source.op == "call_function" and source.target is offer:
        relu, source = source, source.args[1]
        if len(source.users) != 1:
            return False
    if source.op == "call_module":
        return type(modules.get(source.target)) in _UNSAVED_OUTPUT_MODULES
    if source.op == "call_function":
        return source.target in _UNSAVED_OUTPUT_FUNCTIONS
    if source.op == "call_method":
        return source.target in _UNSAVED_OUTPUT_METHODS
    return False


def optional_forward_arguments(model: nn.Module) -> dict[str, object]:
    """The forward's parameters after the image, with their defaults: an explanation passes the
    image alone, so the trace fixes the rest at their defaults.

    Raises:
        UnsupportedModelError: a parameter after the image has no default.
    """
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    required = [p.name for p in parameters if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if required:
        raise UnsupportedModelError(
            f"the model's forward needs {required} besides the image; explanations pass the image alone")
    return {p.name: p.default for p in parameters
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


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
    graph = tracer.trace(model, concrete_args=optional_forward_arguments(model) or None)
    return torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def trace_rule_model(model: nn.Module, layer_sites: bool = False) -> torch.fx.GraphModule:
    """Trace ``model`` and route every activation call site through a recording rule call.

    Every module call's output passes through :func:`capture.offer`, so a CAM can weigh any module
    by name, containers and activations included.

    ReLUs go through :func:`rule_relu`; every later reader of an in-place ReLU's input is pointed
    at the ReLU's output, which is what it would have read after the mutation. A ReLU stays in
    place only where that is safe for autograd (:func:`_mutation_is_safe`, e.g. on a batch norm's
    or a residual sum's output, as in ResNets); elsewhere it becomes out of place, so a model whose
    own in-place ReLUs autograd could not differentiate (two in a row) is still explained exactly.
    Every other activation kind runs out of place, recorded the same way.

    Batch norms become :func:`eval_batch_norm` calls (the module itself whenever it is not a plain
    eval-mode batch norm at call time).

    With ``layer_sites``, every convolution and linear module call (with the batch norm right after
    it, and the ReLU right after that), every other batch norm and every activation whose gradient is
    not its relevance rule ends in a :func:`layer_sites.layer_site` call (see
    :func:`_insert_layer_sites`). A ReLU that reads a site's output runs out of place (the site
    saves that output).

    Raises:
        Exception: whatever ``torch.fx`` raises for a model it cannot trace.
    """
    graph_module = _symbolic_trace(model)
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    _offer_module_outputs(graph)
    if layer_sites:
        _insert_layer_sites(graph, modules)
    position = {node: index for index, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        call = _activation_call(node, modules)
        if call is None:
            continue
        kind, function, args, kwargs, inplace = call
        source = _call_input(node)
        if function is None:
            with graph.inserting_before(node):
                module_node = graph.get_attr(node.target)
        with graph.inserting_after(node):
            if kind == "relu" and not kwargs and len(args) == 1:
                safe = inplace and _mutation_is_safe(source, node, modules, position)
                replacement = graph.call_function(rule_relu_ if safe else rule_relu, (source,))
            elif function is None:
                replacement = graph.call_function(rule_module_activation, (module_node, source))
            else:
                replacement = graph.call_function(rule_activation, (kind, function, *args), kwargs)
        position[replacement] = position[node]
        node.replace_all_uses_with(replacement)
        if inplace:
            for reader in list(source.users):
                if position.get(reader, -1) > position[node]:
                    reader.replace_input_with(source, replacement)
        graph.erase_node(node)
    if layer_sites:
        _insert_activation_sites(graph, modules)
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


def _offer_module_outputs(graph: torch.fx.Graph) -> None:
    """After each module call's output node, an :func:`offer` naming every module that call ends.

    fx records on each node the stack of module calls it ran in (``nn_module_stack``, one key per
    call, so a module called twice has two scopes); a call's output is its last node read from
    outside the scope. Nodes outside any module (the model's own forward) are never offered: the
    root is not a layer.
    """
    scopes: dict[str, tuple[str, list[torch.fx.Node]]] = {}
    for node in graph.nodes:
        for key, (name, _type) in node.meta.get("nn_module_stack", {}).items():
            if name:
                scopes.setdefault(key, (name, []))[1].append(node)
    ends: dict[torch.fx.Node, list[str]] = {}
    for name, members in scopes.values():
        inside = set(members)
        outputs = [node for node in members if any(user not in inside for user in node.users)]
        if outputs:
            ends.setdefault(outputs[-1], []).append(name)
    for node, names in ends.items():
        # Outermost module last: its call ended last.
        names = tuple(sorted(set(names), key=lambda name: -name.count(".")))
        readers = list(node.users)
        with graph.inserting_after(node):
            offered = graph.call_function(offer, (names, node))
        for reader in readers:
            reader.replace_input_with(node, offered)


def _single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _through_offer(node: torch.fx.Node) -> torch.fx.Node:
    """``node``, or the :func:`offer` that passes its value on when it is the only reader."""
    user = _single_user(node)
    return user if user is not None and user.op == "call_function" and user.target is offer else node


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _mutates(reader: torch.fx.Node) -> bool:
    """Whether ``reader`` writes into its input (activations excepted: the trace runs them out of place)."""
    if reader.op == "call_method":
        return reader.target.endswith("_") and reader.target not in METHOD_KINDS
    if reader.op == "call_function":
        return reader.target in _INPLACE_OPERATORS or (
            getattr(reader.target, "__name__", "").endswith("_") and reader.target not in FUNCTION_KINDS)
    return False


def _through_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node:
    """The ReLU that is ``node``'s only reader (and its offer), else ``node``.

    A site that ends after its ReLU sees ``a = relu(z)`` and ``g_a``: the relevance ``a · g_a`` is
    ``z · g_z`` and every rule reads ``z`` only through it (and its sign), so the site saves the
    tensor the ReLU saves anyway, and the ReLU may stay in place.
    """
    reader = _single_user(node)
    if reader is None:
        return node
    call = _activation_call(reader, modules)
    if call is None or call[0] != "relu" or call[3] or len(call[2]) != 1 or call[2][0] is not node:
        return node
    return _through_offer(reader)


def _insert_layer_sites(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> None:
    """A :func:`layer_site` after every convolution or linear module call (merged with the batch norm
    that is its only reader), after every other batch norm module call and after every instance,
    group or layer norm module call.

    Only plain calls (one positional input) of the exact module types are sites; anything else is
    left as it is, and a relevance method refuses what no site covers.
    """
    index = 0
    absorbed: set[torch.fx.Node] = set()
    for node in list(graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or node in absorbed:
            continue
        module = modules.get(node.target)
        kind = LAYER_MODULES.get(type(module))
        batch_norm_node = None
        if kind is not None:
            end = _through_offer(node)
            reader = _single_user(end)
            if (reader is not None and reader.op == "call_module" and type(modules.get(reader.target)) in BATCH_NORMS
                    and reader.args == (end,) and not reader.kwargs):
                batch_norm_node = reader
                absorbed.add(reader)
                end = _through_offer(reader)
        elif type(module) in BATCH_NORMS:
            kind, batch_norm_node, end = BATCH_NORM, node, _through_offer(node)
        elif type(module) in NORMALISATION_MODULES:
            kind, end = NORMALISATION, _through_offer(node)
        else:
            continue
        end = _through_relu(end, modules)
        with graph.inserting_after(end):
            layer_node = graph.get_attr(node.target) if kind != BATCH_NORM else None
        with graph.inserting_after(layer_node if layer_node is not None else end):
            bn_node = graph.get_attr(batch_norm_node.target) if batch_norm_node is not None else None
        readers = list(end.users)
        with graph.inserting_after(bn_node if bn_node is not None else layer_node):
            site = graph.call_function(layer_site, (index, kind, layer_node, bn_node, end, node.args[0]))
        output = site
        if any(_mutates(reader) for reader in readers):
            # The site's output is a view autograd forbids writing to: an in-place reader gets a copy.
            with graph.inserting_after(site):
                output = graph.call_function(torch.clone, (site,))
        index += 1
        for reader in readers:
            reader.replace_input_with(end, output)


# Activations whose gradient is already their relevance rule (R_in = R_out = f·g): ReLU
# (1[f>0]), leaky ReLU and PReLU (phi(f)/f = phi'(f)). Every other kind gets a site.
_GRADIENT_IS_RELEVANCE = {"relu", "leaky_relu", "prelu"}


def _insert_activation_sites(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> None:
    index = 1_000_000  # apart from the layer sites' numbers
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is rule_activation:
            kind, source = node.args[0], node.args[2] if len(node.args) > 2 else node.kwargs.get("input")
        elif node.target is rule_module_activation:
            module = getattr_path(modules, node.args[0])
            kind, source = MODULE_KINDS.get(type(module)), node.args[1]
        else:
            continue
        if kind in _GRADIENT_IS_RELEVANCE or not isinstance(source, torch.fx.Node):
            continue
        readers = list(node.users)
        with graph.inserting_after(node):
            site = graph.call_function(layer_site, (index, ACTIVATION, None, None, node, source), {"activation": kind})
        index += 1
        for reader in readers:
            reader.replace_input_with(node, site)


def getattr_path(modules: dict[str, nn.Module], node) -> nn.Module | None:
    return modules.get(node.target) if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None
