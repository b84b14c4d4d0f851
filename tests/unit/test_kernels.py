"""Our Guided Backprop / DeconvNet / saliency kernels against Captum and an explicit-rule reference."""

import pytest
import torch
from captum.attr import Deconvolution, GuidedBackprop, Saliency

import explainers
from explainers.kernels.rule_models import uses_traced_rules
from support.models import MixedReluNet, ModuleReluNet, TinyResNet, UntraceableNet, randomise_batchnorm, seeded
from support.reference_rules import reference_attribution

RULE_METHODS = ["saliency", "guided_backprop", "deconvnet"]


def assert_close(actual, expected):
    # 1e-5 relative, with an absolute floor for entries that are zero in one and ~1e-12 in the other.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@pytest.fixture
def batch():
    return torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("method, captum_class", [("guided_backprop", GuidedBackprop), ("deconvnet", Deconvolution)])
def test_matches_captum_on_module_relu_model(batch, method, captum_class):
    model = seeded(ModuleReluNet())
    targets = torch.tensor([0, 1, 2, 3, 1])
    ours = explainers.create(method, model).explain(batch, target=targets)
    theirs = captum_class(model).attribute(batch.clone(), target=targets)
    assert ours.method == method and ours.target.tolist() == targets.tolist()
    assert ours.attributions.abs().sum() > 0
    assert_close(ours.attributions, theirs)


def test_saliency_matches_captum_signed_gradient(batch):
    model = seeded(ModuleReluNet())
    targets = torch.tensor([3, 2, 1, 0, 0])
    ours = explainers.create("saliency", model).explain(batch, target=targets)
    assert_close(ours.attributions, Saliency(model).attribute(batch.clone(), target=targets, abs=False))


@pytest.mark.parametrize("model_class", [MixedReluNet, TinyResNet, UntraceableNet])
@pytest.mark.parametrize("method", RULE_METHODS)
def test_matches_explicit_rule_reference(batch, model_class, method):
    model = seeded(model_class())
    randomise_batchnorm(model)
    with torch.no_grad():  # the reference must compute exactly what the model computes
        torch.testing.assert_close(model.reference_forward(batch, torch.relu), model(batch))
    targets = torch.tensor([1, 0, 3, 2, 1])
    ours = explainers.create(method, model).explain(batch, target=targets)
    expected = reference_attribution(model, batch, targets, method)
    assert expected.abs().sum() > 0
    assert_close(ours.attributions, expected)


def test_traced_path_used_where_possible_and_fallback_elsewhere(batch):
    traceable, untraceable = seeded(MixedReluNet()), seeded(UntraceableNet())
    explainers.create("guided_backprop", traceable).explain(batch)
    explainers.create("guided_backprop", untraceable).explain(batch)
    assert uses_traced_rules(traceable)
    assert not uses_traced_rules(untraceable)


def test_rules_differ_where_they_should(batch):
    """Guards against a kernel that silently applies the same rule for every method."""
    model = seeded(MixedReluNet())
    _, maps = explainers.predict_and_explain(model, batch, RULE_METHODS, target=0)
    gbp, deconv, grad = (maps[m].attributions for m in ("guided_backprop", "deconvnet", "saliency"))
    assert not torch.allclose(gbp, grad) and not torch.allclose(gbp, deconv) and not torch.allclose(deconv, grad)


def test_branch_gradient_is_not_clamped():
    """x feeds a ReLU and, unclamped, a second path: guided backprop clamps only the ReLU's share."""

    class Branch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = torch.nn.ReLU()

        def forward(self, x):
            flat = x.flatten(1)
            return torch.stack([(-2.0 * self.relu(flat) + 3.0 * flat).sum(1), flat.sum(1) * 0], dim=1)

    x = torch.tensor([[[[1.0, -1.0]]]])
    gbp = explainers.create("guided_backprop", Branch()).explain(x, target=0).attributions
    # ReLU path: R = -2 < 0 is clamped to 0; the linear path adds its plain 3. Captum would give 0 at x=1.
    assert gbp.flatten().tolist() == [3.0, 3.0]
    deconv = explainers.create("deconvnet", Branch()).explain(x, target=0).attributions
    assert deconv.flatten().tolist() == [3.0, 3.0]
    saliency = explainers.create("saliency", Branch()).explain(x, target=0).attributions
    assert saliency.flatten().tolist() == [1.0, 3.0]


class _DoubleGradient(torch.autograd.Function):
    """Identity forward with a custom backward: fx would trace the forward and drop this backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class CustomFunctionNet(ModuleReluNet):
    def forward(self, x):
        return self.head(_DoubleGradient.apply(self.features(x)))


def test_custom_autograd_function_backward_is_kept(batch):
    model = seeded(CustomFunctionNet())
    plain = seeded(ModuleReluNet())
    ours = explainers.create("guided_backprop", model).explain(batch, target=1).attributions
    expected = GuidedBackprop(plain).attribute(batch.clone(), target=1)
    assert not uses_traced_rules(model)
    # GBP clamps R at every ReLU: scaling R by 2 before the features' ReLUs doubles the map.
    assert_close(ours, 2 * expected)
