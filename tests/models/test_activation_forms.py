"""Every elementwise activation, in every form (module, functional, tensor method, in place), on
the traced and the fallback path: guided backprop and DeconvNet equal the explicit-rule
reference, count one site of the right kind, and every method runs."""

from __future__ import annotations

import pytest
import torch

import explainers
from support.activation_models import ACTIVATION_FORMS, EveryActivationNet, OneActivationNet, expected_sites, seeded_net
from support.battery import REFERENCE_RTOL, relative_difference
from support.reference_rules import explicit_rule_attribution

TARGETS = torch.tensor([0, 3])
RULES = ("saliency", "guided_backprop", "deconvnet")


def _inputs() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))


class Untraceable(torch.nn.Module):
    """The same net behind a Python branch on a tensor value: torch.fx cannot trace it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.sum() > -1e9:
            return self.inner(x)
        return self.inner(-x)


def _check_against_reference(model, forms):
    x = _inputs()
    _, explanations = explainers.predict_and_explain(model, x, RULES, target=TARGETS)
    problems = []
    for rule in RULES:
        expected, sites = explicit_rule_attribution(model, x, TARGETS, rule)
        assert sites == expected_sites(forms)
        difference = relative_difference(explanations[rule].attributions, expected)
        if difference > REFERENCE_RTOL:
            problems.append(f"{rule}: {difference:.3g} of the maximum away from the reference")
        if rule != "saliency" and dict(explanations[rule].rule_sites) != sites:
            problems.append(f"{rule}: rule_sites {dict(explanations[rule].rule_sites)}, expected {sites}")
    return problems


@pytest.mark.parametrize("path", ["traced", "fallback"])
@pytest.mark.parametrize("form", list(ACTIVATION_FORMS))
def test_each_form_gets_its_rule(form, path):
    model = seeded_net(OneActivationNet(form))
    if path == "fallback":
        model = Untraceable(model).eval()
    problems = _check_against_reference(model, [form])
    assert not problems, f"{form} ({path}):\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("path", ["traced", "fallback"])
def test_every_form_in_one_model(path):
    model = seeded_net(EveryActivationNet())
    if path == "fallback":
        model = Untraceable(model).eval()
    problems = _check_against_reference(model, list(ACTIVATION_FORMS))
    assert not problems, "\n  ".join(problems)


@pytest.mark.parametrize("form", [form for form in ACTIVATION_FORMS if "inplace" in form or form.endswith("_")])
def test_every_method_runs_with_an_in_place_activation_first(form):
    """In-place activations straight after the first convolution, where integrated gradients
    splits its affine prefix off and the path points are a leaf."""
    model = seeded_net(OneActivationNet(form))
    x = _inputs()
    _, explanations = explainers.predict_and_explain(
        model, x, ["saliency", "integrated_gradients", "smoothgrad", "occlusion"],
        integrated_gradients={"n_steps": 4}, smoothgrad={"samples": 2}, occlusion={"window": 4})
    for explanation in explanations.values():
        assert torch.isfinite(explanation.attributions).all()
