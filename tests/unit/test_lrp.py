"""LRP (``lrp``) against independent references.

- LRP-epsilon with a vanishing epsilon on a bias-free ReLU network is input x gradient, and the
  relevances sum to the target logit (conservation);
- Captum's ``LRP`` (EpsilonRule / GammaRule set per layer) on sequential CNNs it supports;
- z+, gamma, flat, w^2 and z^B against plain loops written here straight from the rules' formulas
  (zennit's definitions), on 1x1 convolutions over one pixel (dense layers);
- batch norm merged: a conv + BN model equals the same model with the BN folded by hand;
- residual: a residual block against a hand-written proportional split;
- refusals name the operation; the model is left unchanged; concurrent explanations equal serial
  ones; saliency and guided backprop over the same forward are unchanged by an LRP backward.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explainers
from explainers.errors import InvalidOptionError, UnsupportedModelError, UnsupportedOperationError
from explainers.hygiene import explanation_mode
from explainers.run import ExplanationRun
from support.models import seeded

COMPOSITES = ("epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_plus_flat")
STAB = 1e-6


def lrp(model, x, target=None, **options):
    return explainers.create("lrp", model, **options).explain(x, target)


class Flatten(nn.Module):  # Captum's LRP has no rule for nn.Flatten: flatten inside a forward instead
    def __init__(self, body: nn.Sequential, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def small_cnn(pool: type[nn.Module], bias: bool) -> nn.Module:
    body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.ReLU(), pool(2),
                         nn.Conv2d(6, 8, 3, padding=1, bias=bias), nn.ReLU(), pool(2))
    return seeded(Flatten(body, nn.Linear(8 * 4 * 4, 5, bias=bias)), seed=1)


# -- identities ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", [nn.MaxPool2d, nn.AvgPool2d])
def test_epsilon_on_a_bias_free_relu_network_is_input_times_gradient_and_conserves(pool):
    model = small_cnn(pool, bias=False)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    explanation = lrp(model, x, composite="epsilon", epsilon=1e-12)
    x_grad = explainers.create("input_x_gradient", model).explain(x).attributions
    assert torch.allclose(explanation.attributions, x_grad, atol=1e-6, rtol=1e-5)
    logits = model(x).gather(1, explanation.target.view(-1, 1)).flatten()
    sums = explanation.attributions.sum(dim=(1, 2, 3))
    assert torch.allclose(sums, logits, rtol=1e-4, atol=1e-6), (sums, logits)
    assert explanation.attributions.shape == x.shape


@pytest.mark.parametrize("composite", COMPOSITES)
def test_every_composite_conserves_the_target_logit_on_a_bias_free_network(composite):
    # z+, gamma, flat and z^B distribute each layer's relevance without loss when there is no bias.
    model = small_cnn(nn.MaxPool2d, bias=False)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    explanation = lrp(model, x, composite=composite, low=0.0, high=1.0)
    logits = model(x).gather(1, explanation.target.view(-1, 1)).flatten()
    assert torch.allclose(explanation.attributions.sum(dim=(1, 2, 3)), logits, rtol=1e-3, atol=1e-5)


# -- Captum ------------------------------------------------------------------------------------------------------


def captum_lrp(model: nn.Module, x: torch.Tensor, target: torch.Tensor, conv_rule) -> torch.Tensor:
    from captum.attr import LRP
    from captum.attr._utils.lrp_rules import EpsilonRule

    model = copy.deepcopy(model)  # Captum sets rules and hooks on the model's layers
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for index, module in enumerate(model.modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d)):
            module.rule = EpsilonRule(epsilon=1e-9)
    for conv in convs[1:]:
        conv.rule = conv_rule()
    return LRP(model).attribute(x, target=target).detach()


@pytest.mark.parametrize("pool", [nn.MaxPool2d, nn.AvgPool2d])
@pytest.mark.parametrize("bias", [False, True])
def test_epsilon_equals_captums_lrp(pool, bias):
    from captum.attr._utils.lrp_rules import EpsilonRule

    model = small_cnn(pool, bias=bias)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    ours = lrp(model, x, composite="epsilon", epsilon=1e-9)
    theirs = captum_lrp(model, x, ours.target, lambda: EpsilonRule(epsilon=1e-9))
    difference = float((ours.attributions - theirs).abs().max())
    assert difference <= 1e-5 * float(theirs.abs().max()) + 1e-7, difference


def test_gamma_at_convolutions_equals_captums_gamma_rule():
    # Captum's GammaRule is the original gamma (non-negative inputs, bias unchanged): bias-free
    # convolutions after a ReLU are where it and zennit's generalised gamma coincide.
    from captum.attr._utils.lrp_rules import GammaRule

    body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2))
    model = seeded(Flatten(body, nn.Linear(8 * 2 * 2, 5)), seed=5)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    explainer = explainers.create("lrp", model, composite="epsilon_gamma_box", gamma=0.25, epsilon=1e-9)
    # The first convolution: epsilon as in Captum (not the composite's box), through the rule hook.
    explainer.rule_name = lambda call, first, plain=explainer.rule_name: "epsilon" if first else plain(call, first)
    ours = explainer.explain(x)
    theirs = captum_lrp(model, x, ours.target, lambda: GammaRule(gamma=0.25))
    difference = float((ours.attributions - theirs).abs().max())
    assert difference <= 1e-4 * float(theirs.abs().max()), difference


# -- hand-written references on dense layers (1x1 convolutions over one pixel) -------------------------------------


def stab(value: float) -> float:
    return value + ((value == 0) + (value > 0) - (value < 0)) * STAB


class Dense2(nn.Module):
    """``logits = W2 · relu(W1 · x + b1) + b2`` as 1x1 convolutions (so the composites' conv rules apply)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 3, 1)
        self.second = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.first.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.8, -1.0], [-0.6, 0.4, 1.2]]).view(3, 3, 1, 1))
            self.first.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
            self.second.weight.copy_(torch.tensor([[0.7, -0.4, 0.9], [-1.1, 0.6, 0.2]]).view(2, 3, 1, 1))
            self.second.bias.copy_(torch.tensor([-0.05, 0.15]))
        self.eval()

    def forward(self, x):
        return self.second(torch.relu(self.first(x))).flatten(1)


def params(conv: nn.Conv2d):
    w = conv.weight.detach()[:, :, 0, 0].tolist()
    b = conv.bias.detach().tolist()
    return w, b


def ref_z_plus(w, b, x, relevance):
    """R_i = Σ_k (x_i⁺ w_ki⁺ + x_i⁻ w_ki⁻) / stab(Σ_j (x_j⁺ w_kj⁺ + x_j⁻ w_kj⁻) + b_k⁺) · R_k"""
    out = [0.0] * len(x)
    for k, r in enumerate(relevance):
        parts = [max(xi, 0) * max(w[k][i], 0) + min(xi, 0) * min(w[k][i], 0) for i, xi in enumerate(x)]
        denominator = stab(sum(parts) + max(b[k], 0))
        for i in range(len(x)):
            out[i] += parts[i] / denominator * r
    return out


def ref_gamma(w, b, x, relevance, z, gamma):
    """Where z_k > 0: parts x_i⁺(w+γw⁺) + x_i⁻(w+γw⁻), bias b+γb⁺; where z_k < 0: x_i⁺(w+γw⁻) + x_i⁻(w+γw⁺), b+γb⁻."""
    out = [0.0] * len(x)
    for k, r in enumerate(relevance):
        up = lambda v: v + gamma * max(v, 0)  # noqa: E731
        down = lambda v: v + gamma * min(v, 0)  # noqa: E731
        if z[k] > 0:
            parts = [max(xi, 0) * up(w[k][i]) + min(xi, 0) * down(w[k][i]) for i, xi in enumerate(x)]
            denominator = stab(sum(parts) + up(b[k]))
        elif z[k] < 0:
            parts = [max(xi, 0) * down(w[k][i]) + min(xi, 0) * up(w[k][i]) for i, xi in enumerate(x)]
            denominator = stab(sum(parts) + down(b[k]))
        else:
            continue
        for i in range(len(x)):
            out[i] += parts[i] / denominator * r
    return out


def ref_epsilon(w, b, x, relevance, epsilon=STAB):
    out = [0.0] * len(x)
    for k, r in enumerate(relevance):
        z = sum(w[k][i] * x[i] for i in range(len(x))) + b[k]
        denominator = z + ((z == 0) + (z > 0) - (z < 0)) * epsilon
        for i in range(len(x)):
            out[i] += w[k][i] * x[i] / denominator * r
    return out


def ref_flat(w, relevance):
    return [sum(r / stab(float(len(w[k]))) for k, r in enumerate(relevance))] * len(w[0])


def ref_w_square(w, b, relevance):
    out = [0.0] * len(w[0])
    for k, r in enumerate(relevance):
        denominator = stab(sum(v * v for v in w[k]) + b[k] * b[k])
        for i in range(len(w[0])):
            out[i] += w[k][i] ** 2 / denominator * r
    return out


def ref_box(w, b, x, low, high, relevance):
    """R_i = Σ_k (x_i w_ki − l_i w_ki⁺ − h_i w_ki⁻) / stab(Σ_j (x_j w_kj − l_j w_kj⁺ − h_j w_kj⁻)) · R_k"""
    out = [0.0] * len(x)
    for k, r in enumerate(relevance):
        parts = [x[i] * w[k][i] - low[i] * max(w[k][i], 0) - high[i] * min(w[k][i], 0) for i in range(len(x))]
        denominator = stab(sum(parts))
        for i in range(len(x)):
            out[i] += parts[i] / denominator * r
    return out


def dense_case(target: int):
    model = Dense2()
    x = [0.9, -0.4, 0.6]
    w1, b1 = params(model.first)
    w2, b2 = params(model.second)
    hidden_z = [sum(w1[j][i] * x[i] for i in range(3)) + b1[j] for j in range(3)]
    hidden = [max(v, 0.0) for v in hidden_z]
    logits = [sum(w2[k][j] * hidden[j] for j in range(3)) + b2[k] for k in range(2)]
    out_relevance = [logits[k] if k == target else 0.0 for k in range(2)]
    return model, torch.tensor(x).view(1, 3, 1, 1), (w1, b1, w2, b2), x, hidden, logits, out_relevance


@pytest.mark.parametrize("target", [0, 1])
def test_z_plus_against_a_plain_loop(target):
    model, xt, (w1, b1, w2, b2), x, hidden, logits, out_r = dense_case(target)
    # epsilon_plus: z+ at both convolutions (no first-layer rule); the ReLU passes relevance.
    r_hidden = ref_z_plus(w2, b2, hidden, out_r)
    expected = ref_z_plus(w1, b1, x, r_hidden)
    ours = lrp(model, xt, target=target, composite="epsilon_plus").attributions.flatten().tolist()
    assert ours == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("target", [0, 1])
def test_gamma_and_box_against_a_plain_loop(target):
    model, xt, (w1, b1, w2, b2), x, hidden, logits, out_r = dense_case(target)
    # epsilon_gamma_box: z^B at the first convolution, gamma at the second (whose z may be negative).
    low, high = [-1.0, -0.5, -2.0], [1.0, 2.0, 0.7]
    r_hidden = ref_gamma(w2, b2, hidden, out_r, logits, 0.3)
    expected = ref_box(w1, b1, x, low, high, r_hidden)
    ours = lrp(model, xt, target=target, composite="epsilon_gamma_box", gamma=0.3, low=low, high=high)
    assert ours.rule_sites == {"box": 1, "gamma": 1}
    assert ours.attributions.flatten().tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_gamma_with_negative_inputs_against_a_plain_loop():
    # Gamma at a layer reading signed inputs (the first layer, with the box rule swapped out).
    model, xt, (w1, b1, w2, b2), x, hidden, logits, out_r = dense_case(0)
    r_hidden = ref_gamma(w2, b2, hidden, out_r, logits, 0.25)
    hidden_z = [sum(w1[j][i] * x[i] for i in range(3)) + b1[j] for j in range(3)]
    r_hidden_z = [r if z > 0 else 0.0 for r, z in zip(r_hidden, hidden_z)]
    expected = ref_gamma(w1, b1, x, r_hidden_z, hidden_z, 0.25)
    explainer = explainers.create("lrp", model, composite="epsilon_gamma_box")
    explainer.rule_name = lambda call, first: "gamma"
    assert explainer.explain(xt, 0).attributions.flatten().tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("target", [0, 1])
def test_flat_and_epsilon_against_a_plain_loop(target):
    model, xt, (w1, b1, w2, b2), x, hidden, logits, out_r = dense_case(target)
    r_hidden = ref_z_plus(w2, b2, hidden, out_r)
    expected = ref_flat(w1, r_hidden)
    ours = lrp(model, xt, target=target).attributions.flatten().tolist()  # the default: epsilon_plus_flat
    assert ours == pytest.approx(expected, rel=1e-5, abs=1e-7)
    r_hidden = ref_epsilon(w2, b2, hidden, out_r, 1e-3)
    expected = ref_epsilon(w1, b1, x, r_hidden, 1e-3)
    ours = lrp(model, xt, target=target, composite="epsilon", epsilon=1e-3).attributions.flatten().tolist()
    assert ours == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_w_square_against_a_plain_loop():
    model, xt, (w1, b1, w2, b2), x, hidden, logits, out_r = dense_case(0)
    expected = ref_w_square(w1, b1, ref_z_plus(w2, b2, hidden, out_r))
    explainer = explainers.create("lrp", model, composite="epsilon_plus_flat")
    explainer.rule_name = lambda call, first, plain=explainer.rule_name: "w_square" if first else plain(call, first)
    assert explainer.explain(xt, 0).attributions.flatten().tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_flat_on_a_padded_convolution_spreads_over_each_receptive_field():
    # Flat at a 3x3 convolution with padding: each output's relevance split evenly over its in-bounds inputs.
    conv = nn.Conv2d(2, 1, 3, padding=1, bias=False)
    model = seeded(Flatten(nn.Sequential(conv), nn.Identity()), seed=7)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    target = 5
    ours = lrp(model, x, target=target).attributions  # flat at the first (and only) layer
    z = model(x)[0, target].item()
    row, col = divmod(target, 4)
    expected = torch.zeros_like(x)
    cells = [(r, c) for r in range(row - 1, row + 2) for c in range(col - 1, col + 2) if 0 <= r < 4 and 0 <= c < 4]
    for r, c in cells:
        expected[0, :, r, c] = z / stab(2.0 * len(cells))
    assert torch.allclose(ours, expected, atol=1e-6)


def test_box_bounds_default_to_the_batch_range_per_channel():
    model, xt, *_ = dense_case(0)
    batch = torch.cat([xt, xt * -2 + 0.3])
    low, high = batch.amin(dim=(0, 2, 3)).tolist(), batch.amax(dim=(0, 2, 3)).tolist()
    default = lrp(model, batch, target=0, composite="epsilon_gamma_box").attributions
    explicit = lrp(model, batch, target=0, composite="epsilon_gamma_box", low=low, high=high).attributions
    assert torch.equal(default, explicit)


# -- batch norm and residual --------------------------------------------------------------------------------------


class ConvBN(nn.Module):
    def __init__(self, fold: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=fold)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.fold = fold

    def forward(self, x):
        if self.fold:
            x = torch.relu(self.conv1(x))
            x = torch.relu(self.conv2(x))
        else:
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def folded_by_hand(model: ConvBN) -> ConvBN:
    folded = ConvBN(fold=True)
    with torch.no_grad():
        for conv, bn, target in ((model.conv1, model.bn1, folded.conv1), (model.conv2, model.bn2, folded.conv2)):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            target.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.bias)
            target.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
        folded.fc.load_state_dict(model.fc.state_dict())
    return folded.eval()


@pytest.mark.parametrize("composite", COMPOSITES)
def test_batch_norm_merged_equals_the_model_folded_by_hand(composite):
    model = seeded(ConvBN(), seed=9)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.copy_(torch.randn(4) * 0.3)
            bn.running_var.copy_(torch.rand(4) + 0.5)
    folded = folded_by_hand(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    ours = lrp(model, x, composite=composite)
    reference = lrp(folded, x, ours.target, composite=composite)
    assert ours.rule_sites == reference.rule_sites
    assert torch.allclose(ours.attributions, reference.attributions, rtol=1e-4, atol=1e-6)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        s = torch.relu(self.branch(h) + h)
        return self.head(s.mean(dim=(2, 3)))


def epsilon_reference(layer, x, relevance, epsilon):
    """Plain LRP-epsilon at one layer: R_x = x · Wᵀ (R_z / stab(z))."""
    x = x.detach().requires_grad_(True)
    z = layer(x)
    (gradient,) = torch.autograd.grad(z, x, relevance / (z + ((z == 0).float() + z.sign()) * epsilon))
    return (x * gradient).detach()


def test_residual_addition_splits_relevance_in_proportion_to_the_summands():
    model = seeded(Residual(), seed=11)
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(12))
    epsilon = 1e-4
    ours = lrp(model, x, composite="epsilon", epsilon=epsilon)
    target = int(ours.target)
    with torch.no_grad():
        h = torch.relu(model.stem(x))
        y = model.branch(h)
        s = y + h
        pooled = torch.relu(s).mean(dim=(2, 3))
    one_hot = torch.zeros(1, 3)
    one_hot[0, target] = 1
    r_pooled = epsilon_reference(model.head, pooled, model.head(pooled) * one_hot, epsilon)
    r_s = (torch.relu(s) / torch.relu(s).sum(dim=(2, 3), keepdim=True).clamp_min(1e-30)
           * r_pooled.view(1, 4, 1, 1))  # average pooling: in proportion; the ReLU passes it on
    r_y, r_h_skip = y / s * r_s, h / s * r_s  # the addition: in proportion to the summands
    r_h = r_h_skip + epsilon_reference(model.branch, h, r_y, epsilon)
    expected = epsilon_reference(model.stem, x, r_h, epsilon)
    assert ours.rule_sites == {"epsilon": 3, "sum": 1}
    assert torch.allclose(ours.attributions, expected, rtol=1e-4, atol=1e-6)


# -- refusals ------------------------------------------------------------------------------------------------------


class SqueezeExcitation(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = h * torch.sigmoid(self.gate(h.mean(dim=(2, 3)))).view(-1, 4, 1, 1)
        return self.fc(h.mean(dim=(2, 3)))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        out, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.fc(out.mean(dim=1))


class ManualAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        weights = torch.softmax(t @ t.transpose(1, 2), dim=-1)
        return self.fc((weights @ t).mean(dim=1))


class FunctionalLayerNormNet(nn.Module):  # a layer norm outside its module: no site covers it
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.layer_norm(torch.relu(self.conv(x)).mean(dim=(2, 3)), (4,)))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(F.conv2d(x, self.weight)).mean(dim=(2, 3)))


@pytest.mark.parametrize("model, operation, also_named", [
    (SqueezeExcitation(), "sigmoid", ["mul (a product of two input-dependent tensors, e.g. a squeeze-excitation"]),
    (ManualAttention(), "bmm", ["softmax"]), (Attention(), None, []),
    (FunctionalLayerNormNet(), "layer_norm", []), (Functional(), "convolution", ["outside an nn.Conv1d/2d/3d module"])])
def test_models_without_a_rule_are_refused_naming_the_operation(model, operation, also_named):
    with pytest.raises(UnsupportedOperationError) as caught:
        lrp(model.eval(), torch.randn(1, 3, 8, 8))
    error = caught.value
    assert error.http_status == 422 and error.code == "unsupported_model"
    assert error.to_dict()["operation"] == error.operation
    if operation is not None:  # the first found walking back from the output; every one is named
        assert error.operation == operation and operation in str(error)
    for text in also_named:
        assert text in str(error)


class NormalisedNet(nn.Module):
    """Instance, group and layer norms between bias-free layers, as the demo models and ConvNeXt use them."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.instance = nn.InstanceNorm2d(6, affine=True)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.group = nn.GroupNorm(2, 8)
        self.layer = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5, bias=False)

    def forward(self, x):
        x = torch.relu(self.instance(self.conv1(x)))
        x = torch.relu(self.group(self.conv2(x)))
        return self.fc(self.layer(x.mean(dim=(2, 3))))


def held_scale_forward(model: NormalisedNet, x: torch.Tensor) -> torch.Tensor:
    """The model's forward with each norm's standard deviation detached, written out."""
    def normalise(t, dims, weight, bias, eps, shape):
        centred = t - t.mean(dim=dims, keepdim=True)
        std = (t.detach().var(dim=dims, unbiased=False, keepdim=True) + eps).sqrt()
        return centred / std * weight.reshape(shape) + bias.reshape(shape)

    channel = (1, -1, 1, 1)
    y = model.conv1(x)
    y = torch.relu(normalise(y, (2, 3), model.instance.weight, model.instance.bias, model.instance.eps, channel))
    y = model.conv2(y)
    groups = y.reshape(y.shape[0], 2, -1)
    groups = (groups - groups.mean(dim=-1, keepdim=True)) / (
        groups.detach().var(dim=-1, unbiased=False, keepdim=True) + model.group.eps).sqrt()
    y = torch.relu(groups.reshape(y.shape) * model.group.weight.reshape(channel) + model.group.bias.reshape(channel))
    pooled = y.mean(dim=(2, 3))
    return model.fc(normalise(pooled, (1,), model.layer.weight, model.layer.bias, model.layer.eps, (1, -1)))


def test_normalisations_propagate_relevance_with_their_scale_held_constant():
    model = seeded(NormalisedNet(), seed=3)
    with torch.no_grad():  # no norm bias: nothing absorbs relevance, so it is conserved
        for norm in (model.instance, model.group, model.layer):
            norm.bias.zero_()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    explanation = explainers.create("lrp", model, composite="epsilon", epsilon=1e-9).explain(x)
    leaf = x.clone().requires_grad_(True)
    logits = held_scale_forward(model, leaf)
    assert torch.allclose(logits, model(x), atol=1e-5)  # the reference is the model's own forward
    score = logits.gather(1, explanation.target.view(-1, 1)).sum()
    (gradient,) = torch.autograd.grad(score, leaf)
    reference = x * gradient
    assert torch.allclose(explanation.attributions, reference, atol=1e-5, rtol=1e-4)
    sums = explanation.attributions.sum(dim=(1, 2, 3))
    assert torch.allclose(sums, logits.gather(1, explanation.target.view(-1, 1)).squeeze(1).detach(), rtol=1e-4)
    # The module's own backward (the scale differentiated too) is another, non-conservative map.
    (plain,) = torch.autograd.grad(model(leaf).gather(1, explanation.target.view(-1, 1)).sum(), leaf)
    assert not torch.allclose(explanation.attributions, x * plain, atol=1e-3)
    assert explanation.rule_sites.get("normalisation") == 3


def test_an_untraceable_model_is_refused():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x):
            if x.sum() > -1e9:  # data-dependent control flow: fx cannot trace it
                x = self.conv(x)
            return x.mean(dim=(2, 3))

    with pytest.raises(UnsupportedModelError, match="fx cannot trace"):
        lrp(Untraceable().eval(), torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("options", [{"composite": "alpha_beta"}, {"epsilon": -1.0}, {"gamma": "a"},
                                     {"low": [0.0, 1.0], "high": [0.5, 0.5]}, {"low": "x"}])
def test_bad_options_are_refused(options):
    with pytest.raises(InvalidOptionError):
        explainers.create("lrp", Dense2(), **options)


def test_cost_is_one_backward():
    cost = explainers.create("lrp", Dense2()).cost(224, 224)
    assert (cost.evaluations, cost.backward_passes) == (0, 1)


# -- hygiene -------------------------------------------------------------------------------------------------------


def snapshot(model: nn.Module):
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]
    flags = [(m.training, {k: v for k, v in vars(m).items() if not k.startswith("_")}) for m in model.modules()]
    return state, hooks, flags


def test_the_model_is_unchanged_and_other_methods_on_the_same_forward_are_exact():
    model = seeded(ConvBN(), seed=13)
    model.train()  # explanation_mode switches to eval and back
    before = snapshot(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(14))
    methods = [explainers.create(name, model) for name in ("saliency", "guided_backprop")]
    lrp_explainer = explainers.create("lrp", model)
    with explanation_mode(model):
        alone = [ExplanationRun(model, x, [method], None).explain(method).attributions for method in methods]
        run = ExplanationRun(model, x, [*methods, lrp_explainer], None)
        first = run.explain(lrp_explainer).attributions
        after = [run.explain(method).attributions for method in methods]
        again = run.explain(lrp_explainer).attributions
    for expected, observed in zip(alone, after):
        assert torch.equal(expected, observed)
    assert torch.equal(first, again)
    after_state = snapshot(model)
    assert all(torch.equal(before[0][k], after_state[0][k]) for k in before[0])
    assert before[1] == after_state[1] and repr(before[2]) == repr(after_state[2])


def test_concurrent_explanations_equal_serial_ones():
    model = small_cnn(nn.MaxPool2d, bias=True)
    inputs = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(20 + i)) for i in range(4)]
    composites = ["epsilon_plus_flat", "epsilon", "epsilon_gamma_box", "epsilon_plus"]
    serial = [lrp(model, x, composite=c).attributions for x, c in zip(inputs, composites)]
    results: dict[int, torch.Tensor] = {}
    errors = []

    def work(index):
        try:
            for _ in range(5):
                results[index] = lrp(model, inputs[index], composite=composites[index]).attributions
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for index in range(4):
        assert torch.equal(results[index], serial[index])


class WritesInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        h = self.conv(x)
        h.mul_(2.0)  # an in-place write on a layer's output
        h += 1.0
        return self.fc(torch.relu(h).mean(dim=(2, 3)))


def test_a_layer_output_written_in_place_is_explained():
    # The site's output is a view autograd forbids writing to: the trace hands the writer a copy.
    model = seeded(WritesInPlace(), seed=30)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(31))
    ours = lrp(model, x, target=[0, 1], composite="epsilon", epsilon=1e-12).attributions
    x_grad = explainers.create("input_x_gradient", model).explain(x, [0, 1]).attributions
    assert torch.allclose(ours, x_grad, atol=1e-6)


class SmoothDense(Dense2):
    """Dense2 with a GELU: LRP passes relevance through it unchanged (R_in = R_out)."""

    def forward(self, x):
        return self.second(F.gelu(self.first(x))).flatten(1)


def test_a_smooth_activation_passes_relevance_unchanged():
    model = SmoothDense()
    xt = torch.tensor([0.9, -0.4, 0.6]).view(1, 3, 1, 1)
    x = xt.flatten().tolist()
    w1, b1 = params(model.first)
    w2, b2 = params(model.second)
    hidden_z = [sum(w1[j][i] * x[i] for i in range(3)) + b1[j] for j in range(3)]
    hidden = F.gelu(torch.tensor(hidden_z)).tolist()
    logit = sum(w2[0][j] * hidden[j] for j in range(3)) + b2[0]
    r_hidden = ref_epsilon(w2, b2, hidden, [logit, 0.0], 1e-3)  # R at the GELU's output = R at its input
    expected = ref_epsilon(w1, b1, x, r_hidden, 1e-3)
    ours = lrp(model, xt, target=0, composite="epsilon", epsilon=1e-3)
    assert ours.rule_sites == {"epsilon": 2, "pass": 1}
    assert ours.attributions.flatten().tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


class Normalising(nn.Module):
    """Normalises inside its forward: the first convolution still reads the image elementwise."""

    def __init__(self):
        super().__init__()
        self.inner = small_cnn(nn.MaxPool2d, bias=True)

    def forward(self, x):
        return self.inner((x - 0.5) / 0.25)


def test_the_first_layer_rule_applies_through_an_elementwise_normalisation():
    model = Normalising().eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(40))
    ours = lrp(model, x, composite="epsilon_plus_flat")
    reference = lrp(model.inner, (x - 0.5) / 0.25, ours.target, composite="epsilon_plus_flat")
    assert ours.rule_sites == reference.rule_sites == {"flat": 1, "z_plus": 1, "epsilon": 1}
    assert torch.allclose(ours.attributions, reference.attributions, atol=1e-6)


def test_nothing_keeps_an_explained_model_alive():
    import gc
    import weakref

    model = small_cnn(nn.MaxPool2d, bias=True)
    lrp(model, torch.randn(1, 3, 16, 16), composite="epsilon_gamma_box")
    references = [weakref.ref(module) for module in model.modules()]  # caches hold layers, if anything
    del model
    for _ in range(3):  # a collected cycle's weak-reference callbacks may free more
        gc.collect()
    assert all(reference() is None for reference in references)
