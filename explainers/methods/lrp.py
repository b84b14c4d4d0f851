"""Layer-wise Relevance Propagation (Bach et al. 2015; Montavon et al. 2019) on the shared forward.

One backward over the :class:`ForwardRecord` the prediction ran, with the layer sites of its rule
model (``kernels/layer_sites.py``) applying the composite's rule at each convolution and linear
layer (eval batch norms merged into the layer before them) and every other node keeping its plain
gradient, which is its LRP rule in the ``input x modified gradient`` form (ReLU and max pooling:
winner takes all; addition: split in proportion to the summands; average pooling: in proportion to
the inputs). Composites, as zennit defines them (``zennit.composites``):

* ``epsilon``: epsilon at every layer;
* ``epsilon_plus``: z+ at convolutions, epsilon at linear layers;
* ``epsilon_gamma_box``: z^B at a first convolution, gamma at convolutions, epsilon at linear layers;
* ``epsilon_plus_flat`` (default): flat at a first layer, z+ at convolutions, epsilon at linear layers.

A "first layer" is a layer site fed by the image with nothing but elementwise or reshaping
operations in between (zennit takes the first such module in registration order instead).
Batch norms that follow no convolution or linear layer get the epsilon rule as the diagonal linear
layer they are; instance, group and layer norm modules get it over the linear map they are once
their scale (the standard deviation they divide by) is held constant (Ali et al. 2022's LN-rule,
also LXT's); elementwise activations other than ReLU / leaky ReLU / PReLU pass relevance unchanged.

Models with an operation LRP has no rule for (a product of two input-dependent tensors such as
squeeze-excitation gates or attention, softmax, a functional layer or group norm outside its
module, sigmoid or tanh, a functional convolution outside a module) are refused with :class:`UnsupportedOperationError` naming it, as are
models fx cannot trace (no layer sites).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from ..base import Cost, GradientRuleExplainer
from ..errors import InvalidOptionError, UnsupportedModelError, UnsupportedOperationError
from ..kernels import lrp_rules
from ..kernels.forward_record import ForwardRecord
from ..kernels.layer_sites import ACTIVATION, BATCH_NORM, CONVOLUTION, LINEAR, NORMALISATION, SiteCall, is_site_node
from ..kernels.rule_models import rule_path
from ..options import number
from ..registry import register

COMPOSITES = ("epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_plus_flat")

# Autograd nodes (name without "Backward<n>") whose plain gradient is their LRP rule in the x*g form.
_PASSING = {
    "View", "Reshape", "ReshapeAlias", "UnsafeView", "Permute", "Transpose", "T", "Clone", "Squeeze", "Unsqueeze",
    "Expand", "Slice", "Select", "Cat", "Stack", "Split", "SplitWithSizes", "Unbind", "Index", "ToCopy", "Alias",
    "ConstantPadNd", "Flip", "Roll", "Repeat", "Neg", "Add", "Sub", "Mean", "Sum", "Gather", "AsStrided",
    "AvgPool1D", "AvgPool2D", "AvgPool3D", "AdaptiveAvgPool1D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D",
    "MaxPool2DWithIndices", "MaxPool3DWithIndices", "AdaptiveMaxPool1D", "AdaptiveMaxPool2D", "AdaptiveMaxPool3D",
    "Max", "Amax", "Relu", "Threshold", "LeakyRelu", "PreluKernel", "Prelu", "UpsampleNearest1D",
    "UpsampleNearest2D", "UpsampleNearest3D", "UpsampleBilinear2D", "PixelShuffle", "PixelUnshuffle",
}
# Products: a linear map of one input-dependent operand (the other a constant or a parameter).
_NAMES = {
    "Mul": "mul (a product of two input-dependent tensors, e.g. a squeeze-excitation or attention gate)",
    "Div": "div (division by an input-dependent tensor)",
    "Softmax": "softmax", "LogSoftmax": "log_softmax", "NativeLayerNorm": "layer_norm",
    "NativeGroupNorm": "group_norm", "Sigmoid": "sigmoid", "Hardsigmoid": "hardsigmoid", "Tanh": "tanh",
    "Convolution": "convolution outside an nn.Conv1d/2d/3d module call (a functional call or a subclass)",
    "NativeBatchNorm": "instance_norm or batch_norm with batch statistics (normalising by the input's own statistics)",
    "CudnnBatchNorm": "instance_norm or batch_norm with batch statistics (normalising by the input's own statistics)",
}
for _matrix in ("Mm", "Bmm", "Matmul", "Addmm", "Baddbmm", "Addbmm", "Einsum", "Dot", "Mv"):
    _NAMES[_matrix] = f"{_matrix.lower()} (a matrix product outside an nn.Linear module call, e.g. attention)"


def _short_name(node) -> str:
    return re.sub(r"Backward\d*$", "", type(node).__name__)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class _Analysis:
    """What one forward's autograd graph says about LRP: first-layer sites and residual sums.

    Raises:
        UnsupportedOperationError: nodes on paths from the image to the output have no rule (all of
            them are named; ``operation`` is the first found, walking back from the output).
    """

    def __init__(self, record: ForwardRecord):
        self.first_sites: set[int] = set()
        self.first_site_shapes_match = True
        self.sums = 0
        self._refused: dict[str, str] = {}  # operation -> autograd node type, in the order found
        root = record.logits.grad_fn
        inputs = record.inputs
        # node -> (reaches the image, reaches it with no layer site in between)
        reach: dict = {}
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node is None or (node in reach and not expanded):
                continue
            children = self._children(node)
            if not expanded:
                if type(node).__name__ == "AccumulateGrad":
                    is_input = node.variable is inputs
                    reach[node] = (is_input, is_input)
                    continue
                reach[node] = None  # in progress
                stack.append((node, True))
                stack.extend((child, False) for child in children if child is not None and child not in reach)
                continue
            child_reach = [reach.get(child) or (False, False) for child in children if child is not None]
            reaches = any(r for r, _ in child_reach)
            direct = any(d for _, d in child_reach)
            if is_site_node(node):
                if direct:
                    self.first_sites.add(self._site_index(node))
                reach[node] = (reaches, False)
                continue
            reach[node] = (reaches, direct)
            if reaches:
                self._check(node, [r for r, _ in child_reach], children)
        if self._refused:
            operations = list(self._refused)
            found = ", ".join(f"{_NAMES.get(name, _snake(name))} ({node})" for name, node in self._refused.items())
            raise UnsupportedOperationError(
                f"lrp has no relevance rule for: {found}; it explains networks of convolutions, linear layers, "
                f"batch, instance, group and layer norms, elementwise activations, pooling and additions", _snake(operations[0]) if operations[0]
                not in _NAMES else _NAMES[operations[0]].split(" ")[0])
        self.site_indices = {self._site_index(node) for node in reach if is_site_node(node) and reach[node][0]}

    @staticmethod
    def _site_index(node) -> int:
        return node.index  # a custom Function's backward node is its ctx

    @staticmethod
    def _children(node) -> list:
        edges = node.next_functions
        if is_site_node(node):
            return [edges[1][0]]  # only the layer's input: the layer's own nodes get no gradient under a rule
        return [edge[0] for edge in edges]

    def _check(self, node, child_reaches: list[bool], children) -> None:
        name = _short_name(node)
        dependent = sum(child_reaches)
        if name in ("Add", "Sub") and dependent >= 2:
            self.sums += 1
            return
        if name in _PASSING:
            return
        if name == "Div" and not (len(child_reaches) > 1 and child_reaches[1]):
            return  # division by a constant: a linear scaling
        if name in ("Mul", "Addcmul") and dependent <= 1:
            return  # scaling by a constant or a parameter (layer scale): linear
        self._refused.setdefault(name, type(node).__name__)


@register("lrp")
class LRP(GradientRuleExplainer):
    """Layer-wise Relevance Propagation: input relevances ``[B, C, H, W]`` of the target logit.

    Options:
        composite: ``epsilon_plus_flat`` (default), ``epsilon_plus``, ``epsilon_gamma_box`` or ``epsilon``.
        epsilon: the epsilon rule's stabiliser (default 1e-6, zennit's).
        gamma: the gamma rule's weight on positive contributions (default 0.25).
        low, high: the bounds of the z^B (box) rule at a first layer, in model-input space: a number
            or one per channel. Default: each channel's minimum and maximum over the batch; the
            request service passes the values of pixels 0 and 1 under the model's normalisation.
    """

    shares_forward = True
    applies_rules = True
    needs_layer_sites = True
    # Takes ``low``/``high``: a server that knows the model's normalisation passes the model-input
    # values of pixels 0 and 1 per channel.
    takes_input_bounds = True

    def __init__(self, model: nn.Module, *, composite: str = "epsilon_plus_flat", epsilon: float = 1e-6,
                 gamma: float = 0.25, low: float | Sequence[float] | None = None,
                 high: float | Sequence[float] | None = None):
        super().__init__(model)
        if composite not in COMPOSITES:
            raise InvalidOptionError(f"composite must be one of {list(COMPOSITES)}, got {composite!r}")
        self.composite = composite
        self.epsilon = number("epsilon", epsilon)
        if self.epsilon < 0:
            raise InvalidOptionError(f"epsilon must be >= 0, got {epsilon!r}")
        self.gamma = number("gamma", gamma)
        if self.gamma < 0:
            raise InvalidOptionError(f"gamma must be >= 0, got {gamma!r}")
        self.low, self.high = _bound("low", low), _bound("high", high)
        if self.low is not None and self.high is not None and not bool((self.low <= self.high).all()):
            raise InvalidOptionError("low must not exceed high")

    def cost(self, height: int, width: int) -> Cost:
        return Cost(evaluations=0, backward_passes=1, rows_per_forward=1)

    # -- rules -------------------------------------------------------------------------------------

    def rule_name(self, call: SiteCall, first: bool) -> str:
        """The rule the composite puts at ``call`` (``first``: fed by the image)."""
        if call.kind == ACTIVATION:
            return "pass"
        if call.kind == BATCH_NORM:
            return "epsilon"
        if call.kind == NORMALISATION:
            return "normalisation"
        composite = self.composite
        if first and composite == "epsilon_plus_flat":
            return "flat"
        if first and composite == "epsilon_gamma_box" and call.kind == CONVOLUTION:
            return "box"
        if call.kind == LINEAR or composite == "epsilon":
            return "epsilon"
        return "gamma" if composite == "epsilon_gamma_box" else "z_plus"

    def _rules(self, inputs: torch.Tensor) -> dict:
        low = self.low if self.low is not None else _channel_extreme(inputs, torch.amin)
        high = self.high if self.high is not None else _channel_extreme(inputs, torch.amax)
        return {"pass": lrp_rules.pass_rule, "epsilon": lrp_rules.epsilon_rule(self.epsilon),
                "normalisation": lrp_rules.normalisation_rule(self.epsilon),
                "z_plus": lrp_rules.z_plus_rule, "gamma": lrp_rules.gamma_rule(self.gamma),
                "flat": lrp_rules.flat_rule, "w_square": lrp_rules.w_square_rule,
                "box": lrp_rules.box_rule(_per_channel(low, inputs), _per_channel(high, inputs))}

    def _analysis(self, record: ForwardRecord) -> _Analysis:
        state = record.site_state
        if state is None:
            raise RuntimeError("lrp needs a forward pass with layer sites")
        cached = getattr(state, "lrp_analysis", None)
        if cached is not None:
            return cached
        if not state.calls:
            path = rule_path(record.model, layer_sites=True)
            reason = f": {path.reason}" if path is not None and path.kind != "traced" else ""
            raise UnsupportedModelError(
                f"lrp needs the model traced into layers (convolutions, linear layers) and found none{reason}")
        state.lrp_analysis = _Analysis(record)  # the graph of one forward: the same for every target
        return state.lrp_analysis

    def attribute_from_record(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        analysis = self._analysis(record)
        rules = self._rules(record.inputs.detach())
        names = {index: self.rule_name(call, index in analysis.first_sites)
                 for index, call in record.site_state.calls.items()}
        inputs = record.inputs.detach()

        def rule(call, x, z, g):
            name = names[call.index]
            if name in ("flat", "w_square", "box") and x.shape != inputs.shape:
                raise UnsupportedModelError(
                    f"lrp's {name} rule at the first layer needs that layer to read the image itself "
                    f"(shape {list(inputs.shape)}), it reads {list(x.shape)}")
            return rules[name](call, x, z, g)

        gradient, direct = record.site_backward(targets, rule)
        relevance = inputs * gradient
        return relevance if direct is None else relevance + direct

    def rule_sites_of(self, record: ForwardRecord) -> dict[str, int]:
        """Rule -> number of layer sites it applied at, plus ``sum``: residual additions split in proportion."""
        analysis = self._analysis(record)
        counts: dict[str, int] = {}
        for index, call in record.site_state.calls.items():
            if index in analysis.site_indices:
                name = self.rule_name(call, index in analysis.first_sites)
                counts[name] = counts.get(name, 0) + 1
        if analysis.sums:
            counts["sum"] = analysis.sums
        return counts


def _bound(name: str, value) -> torch.Tensor | None:
    if value is None:
        return None
    values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or not values:
        raise InvalidOptionError(f"{name} must be a number or a list of numbers (one per channel), got {value!r}")
    return torch.tensor([number(name, v) for v in values], dtype=torch.float32)


def _per_channel(values: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    if values.numel() not in (1, inputs.shape[1]):
        raise InvalidOptionError(f"low/high need 1 or {inputs.shape[1]} values (one per channel), got {values.numel()}")
    return values.to(inputs).view(1, -1, *([1] * (inputs.dim() - 2)))


def _channel_extreme(inputs: torch.Tensor, reduce) -> torch.Tensor:
    dims = [0] + list(range(2, inputs.dim()))
    return reduce(inputs, dim=dims)
