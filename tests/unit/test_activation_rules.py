"""Guided backprop and DeconvNet at every activation kind and call form, against hand-computed values.

The model is ``score_k = Σ_j W2[k, j] · phi(Σ_i W1[j, i] · x_i)``: the gradient arriving at the
activation is ``R_j = W2[k, j]``, so the rules' results are written out directly:
saliency ``W1ᵀ (phi'(f) · R)``, guided ``W1ᵀ (phi'(f) · max(R, 0))``, deconvnet ``W1ᵀ max(R, 0)``,
with ``phi'`` taken from autograd on the plain function.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explainers
from explainers.kernels.rule_models import rule_path

KINDS = {
    # kind: (module, functional call, in-place functional call or None)
    "relu": (nn.ReLU(), F.relu, F.relu_),
    "relu6": (nn.ReLU6(), F.relu6, lambda x: F.relu6(x, inplace=True)),
    "hardtanh": (nn.Hardtanh(-0.5, 0.7), lambda x: F.hardtanh(x, -0.5, 0.7), lambda x: F.hardtanh_(x, -0.5, 0.7)),
    "leaky_relu": (nn.LeakyReLU(0.1), lambda x: F.leaky_relu(x, 0.1), lambda x: F.leaky_relu_(x, 0.1)),
    "elu": (nn.ELU(0.8), lambda x: F.elu(x, 0.8), lambda x: F.elu_(x, 0.8)),
    "selu": (nn.SELU(), F.selu, torch.selu_),
    "celu": (nn.CELU(1.3), lambda x: F.celu(x, 1.3), lambda x: torch.celu_(x, 1.3)),
    "gelu": (nn.GELU(), F.gelu, None),
    "gelu_tanh": (nn.GELU("tanh"), lambda x: F.gelu(x, approximate="tanh"), None),
    "silu": (nn.SiLU(), F.silu, lambda x: F.silu(x, inplace=True)),
    "mish": (nn.Mish(), F.mish, lambda x: F.mish(x, inplace=True)),
    "hardswish": (nn.Hardswish(), F.hardswish, lambda x: F.hardswish(x, inplace=True)),
    "softplus": (nn.Softplus(2.0, 5.0), lambda x: F.softplus(x, 2.0, 5.0), None),
}
REPORTED_KIND = {"gelu_tanh": "gelu"}


class TwoLayer(nn.Module):
    def __init__(self, activation, form: str):
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.first = nn.Linear(6, 5, bias=False)
        self.second = nn.Linear(5, 3, bias=False)
        with torch.no_grad():
            self.first.weight.copy_(torch.randn(5, 6, generator=generator))
            self.second.weight.copy_(torch.randn(3, 5, generator=generator))
        self.form = form
        self.activation = activation

    def forward(self, x, unused_flag: bool = False):  # an optional argument, as real models have
        hidden = self.first(x.flatten(1))
        if self.form == "inplace":
            hidden = hidden + 0  # a fresh tensor the in-place call may overwrite
            self.activation(hidden)
        else:
            hidden = self.activation(hidden)
        return self.second(hidden)


def expected(model: TwoLayer, plain, x: torch.Tensor, target: int, rule: str) -> torch.Tensor:
    w1, w2 = model.first.weight.detach(), model.second.weight.detach()
    f = x.flatten(1) @ w1.T
    slope = torch.func.vmap(torch.func.grad(lambda v: plain(v.view(1)).sum()))(f.flatten()).view_as(f)
    arriving = w2[target].expand_as(f)
    backward = {"saliency": slope * arriving, "guided_backprop": slope * arriving.clamp(min=0),
                "deconvnet": arriving.clamp(min=0)}[rule]
    return (backward @ w1).view_as(x)


CASES = [(kind, form) for kind, forms in KINDS.items() for form, call in zip(("module", "functional", "inplace"), forms)
         if call is not None]


@pytest.mark.parametrize("kind, form", CASES)
def test_rules_at_every_activation_form(kind, form):
    module, functional, inplace = KINDS[kind]
    activation = {"module": module, "functional": functional, "inplace": inplace}[form]
    model = TwoLayer(activation, form).eval()
    x = torch.randn(2, 1, 2, 3, generator=torch.Generator().manual_seed(5))
    _, maps = explainers.predict_and_explain(model, x, ["saliency", "guided_backprop", "deconvnet"], target=1)
    for rule, explanation in maps.items():
        torch.testing.assert_close(explanation.attributions, expected(model, functional, x, 1, rule),
                                   rtol=1e-5, atol=1e-6, msg=f"{kind} {form} {rule}")
    assert maps["guided_backprop"].rule_sites == {REPORTED_KIND.get(kind, kind): 1}
    assert maps["saliency"].rule_sites == {}  # the plain gradient applies no rule
    assert not torch.allclose(maps["guided_backprop"].attributions, maps["saliency"].attributions)
    assert rule_path(model).kind == "traced", rule_path(model)


@pytest.mark.parametrize("kind", ["silu", "elu", "relu6", "hardswish"])
def test_the_fallback_path_applies_the_same_rules_in_place_too(kind):
    module, functional, inplace = KINDS[kind]

    class Untraceable(TwoLayer):
        def forward(self, x):
            if float(x.sum()) > -1e9:  # Python control flow on a value: fx cannot trace this
                return super().forward(x)
            return x

    model = Untraceable(inplace, "inplace").eval()
    x = torch.randn(2, 1, 2, 3, generator=torch.Generator().manual_seed(6))
    _, maps = explainers.predict_and_explain(model, x, ["guided_backprop", "deconvnet"], target=2)
    assert rule_path(model).kind == "fallback"
    for rule, explanation in maps.items():
        torch.testing.assert_close(explanation.attributions, expected(model, functional, x, 2, rule), rtol=1e-5, atol=1e-6)
    assert maps["deconvnet"].rule_sites == {kind: 1}


def test_gates_keep_their_plain_gradient():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.gate = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x = x.flatten(1)
            hidden = F.silu(self.linear(x)) * torch.sigmoid(self.gate(x)) * F.hardsigmoid(x) * torch.tanh(x)
            return self.head(torch.softmax(hidden, dim=1))

    torch.manual_seed(0)
    model = Gated().eval()
    _, maps = explainers.predict_and_explain(model, torch.randn(3, 1, 2, 2), ["guided_backprop"])
    assert maps["guided_backprop"].rule_sites == {"silu": 1}


def test_models_returning_a_mapping_or_a_tuple_are_explained():
    class Wrapped(nn.Module):
        def __init__(self, wrap):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
            self.wrap = wrap

        def forward(self, x):
            logits = self.net(x)
            return {"logits": logits, "features": x} if self.wrap == "dict" else (logits, x.mean())

    x = torch.randn(2, 3, 4, 4)
    for wrap in ("dict", "tuple"):
        torch.manual_seed(1)
        model = Wrapped(wrap).eval()
        logits, maps = explainers.predict_and_explain(model, x, ["guided_backprop", "grad_cam", "integrated_gradients"])
        torch.testing.assert_close(logits, model.net(x))
        assert maps["grad_cam"].layer == "net.1" and maps["guided_backprop"].rule_sites == {"relu": 1}


def test_a_forward_that_needs_more_than_the_image_is_refused_with_a_typed_error():
    class NeedsMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(12, 2)

        def forward(self, x, mask):
            return self.linear((x * mask).flatten(1))

    with pytest.raises(explainers.errors.UnsupportedModelError, match="mask"):
        explainers.create("saliency", NeedsMask()).explain(torch.randn(1, 3, 2, 2))
