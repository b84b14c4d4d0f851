"""The explicit-rule reference itself: it must see every activation form, change nothing in the
forward, give the plain gradient for saliency, and the papers' rules when computed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.activation_models import (
    ACTIVATION_FORMS,
    EveryActivationNet,
    OneActivationNet,
    expected_sites,
    seeded_net,
)
from support.models import MixedReluNet, TinyResNet, UntraceableNet, randomise_batchnorm, seeded
from support.reference_rules import RULES, ExplicitRuleMode, explicit_rule_attribution, reference_attribution

TARGETS = torch.tensor([0, 3])


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _plain_gradient(model, x, targets):
    x = x.clone().requires_grad_(True)
    logits = model(x)
    (gradient,) = torch.autograd.grad(logits[torch.arange(len(targets)), targets].sum(), x)
    return gradient


def _close(actual, expected, rtol=1e-5):
    scale = expected.abs().max().clamp(min=1e-30)
    return ((actual - expected).abs().max() / scale).item() <= rtol


@pytest.mark.parametrize("form", list(ACTIVATION_FORMS))
def test_each_form_is_one_site_and_saliency_is_the_plain_gradient(form):
    model = seeded_net(OneActivationNet(form))
    x = _inputs()
    plain = _plain_gradient(model, x, TARGETS)
    with torch.no_grad(), ExplicitRuleMode("guided_backprop") as mode:
        intercepted_logits = model(x)
    torch.testing.assert_close(intercepted_logits, model(x), rtol=1e-6, atol=1e-6)
    assert dict(mode.sites) == expected_sites([form])
    saliency, sites = explicit_rule_attribution(model, x, TARGETS, "saliency")
    assert sites == expected_sites([form])
    assert plain.abs().max() > 0
    assert _close(saliency, plain)


@pytest.mark.parametrize("rule", ["guided_backprop", "deconvnet"])
@pytest.mark.parametrize("form", list(ACTIVATION_FORMS))
def test_rules_match_a_hand_computation(form, rule):
    model = seeded_net(OneActivationNet(form))
    x = _inputs().requires_grad_(True)
    pre = model.head(x)
    f = pre.detach().requires_grad_(True)
    activated = model.activation(f.clone())          # clone: in-place forms may not write into a leaf
    (slope,) = torch.autograd.grad(activated, f, torch.ones_like(activated))
    post = activated.detach().requires_grad_(True)
    logits = model.tail(post)
    (incoming,) = torch.autograd.grad(logits[torch.arange(2), TARGETS].sum(), post)
    arriving = incoming.clamp(min=0) * (slope if rule == "guided_backprop" else 1.0)
    (expected,) = torch.autograd.grad(pre, x, arriving)

    attribution, _ = explicit_rule_attribution(model, x.detach(), TARGETS, rule)
    assert expected.abs().max() > 0
    assert _close(attribution, expected)
    # The rule changes the answer: otherwise this test could not tell a rule from the gradient.
    assert not _close(attribution, _plain_gradient(model, x.detach(), TARGETS), rtol=1e-3)


def test_every_form_in_one_forward_is_counted_and_exact_for_saliency():
    model = seeded_net(EveryActivationNet())
    x = _inputs(2)
    for rule in RULES:
        attribution, sites = explicit_rule_attribution(model, x, TARGETS, rule)
        assert sites == expected_sites(model.forms)
        if rule == "saliency":
            assert _close(attribution, _plain_gradient(model, x, TARGETS))


@pytest.mark.parametrize("model_class", [MixedReluNet, TinyResNet, UntraceableNet])
@pytest.mark.parametrize("rule", RULES)
def test_mode_agrees_with_the_written_out_relu_reference(model_class, rule):
    model = randomise_batchnorm(seeded(model_class()))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([1, 2])
    by_mode, sites = explicit_rule_attribution(model, x, targets, rule)
    by_reference_forward = reference_attribution(model, x, targets, rule)
    assert set(sites) == {"relu"}
    torch.testing.assert_close(by_mode, by_reference_forward, rtol=1e-5, atol=1e-7)


class GatesOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = self.conv(x)
        x = x * torch.sigmoid(x) * F.hardsigmoid(x) + torch.tanh(x) + x.sigmoid()
        x = x * torch.softmax(x.flatten(2), dim=-1).view_as(x)
        return self.fc(x.mean(dim=(2, 3)))


def test_gates_are_not_sites():
    model = seeded_net(GatesOnly())
    x = _inputs()
    attribution, sites = explicit_rule_attribution(model, x, TARGETS, "guided_backprop")
    assert sites == {}
    assert _close(attribution, _plain_gradient(model, x, TARGETS))


def test_the_model_is_left_as_it_was():
    model = seeded_net(EveryActivationNet()).train()
    model.stem.eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    flags = [module.training for module in model.modules()]
    explicit_rule_attribution(model, _inputs(), TARGETS, "deconvnet", copy_model=False)
    assert [module.training for module in model.modules()] == flags
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
