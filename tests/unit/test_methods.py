"""Every registered explainer, against Captum and against hand-computed values."""

import pytest
import torch
from captum.attr import GuidedGradCam, InputXGradient, IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel, Occlusion, Saliency
from torch import nn

import explainers
from support.models import ModuleReluNet, TinyResNet, seeded

GRADIENT_RULE_METHODS = {"saliency", "input_x_gradient", "guided_backprop", "deconvnet", "grad_cam", "guided_grad_cam", "lrp"}
# One map per row rather than per input channel.
CAM_METHODS = {"grad_cam", "grad_cam_plus_plus", "xgrad_cam", "hires_cam", "layer_cam", "normgrad", "eigen_cam",
               "score_cam", "ablation_cam"}


def assert_close(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-6 * float(expected.abs().max()))


@pytest.fixture
def batch():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def test_registry_lists_the_contract_names():
    assert explainers.available() == sorted([
        "saliency", "input_x_gradient", "guided_backprop", "deconvnet", "integrated_gradients",
        "smoothgrad", "grad_cam", "guided_grad_cam", "occlusion", "grad_cam_plus_plus", "xgrad_cam", "hires_cam",
        "layer_cam", "eigen_cam", "score_cam", "ablation_cam", "normgrad", "lrp"])


@pytest.mark.parametrize("name", explainers.available())
def test_every_explainer_explains_a_residual_model(name, batch):
    model = seeded(TinyResNet())
    options = {"occlusion": {"window": 4}, "smoothgrad": {"samples": 4}}.get(name, {})
    explanation = explainers.create(name, model, **options).explain(batch, target=[0, 1, 2])
    channels = 1 if name in CAM_METHODS else 3
    assert explanation.method == name
    assert explanation.attributions.shape == (3, channels, 16, 16)
    assert explanation.target.dtype == torch.long and explanation.target.tolist() == [0, 1, 2]
    assert torch.isfinite(explanation.attributions).all()
    assert explanation.attributions.abs().sum() > 0
    assert not explanation.attributions.requires_grad


def test_integrated_gradients_completeness(batch):
    """Attributions sum to score(input) - score(baseline) within 1 % at 64 steps."""
    model = seeded(ModuleReluNet())
    targets = torch.tensor([0, 2, 3])
    attributions = explainers.create("integrated_gradients", model, n_steps=64).explain(batch, target=targets).attributions
    with torch.no_grad():
        rows = torch.arange(3)
        delta = model(batch)[rows, targets] - model(torch.zeros_like(batch))[rows, targets]
    total = attributions.sum(dim=(1, 2, 3))
    assert torch.all((total - delta).abs() <= 0.01 * delta.abs()), (total, delta)


def test_integrated_gradients_equals_captum(batch):
    model = seeded(ModuleReluNet())
    targets = torch.tensor([1, 1, 0])
    ours = explainers.create("integrated_gradients", model, n_steps=16, baseline=0.5, internal_batch_size=8)
    theirs = IntegratedGradients(model).attribute(batch, baselines=0.5, target=targets, n_steps=16,
                                                  internal_batch_size=8, method="riemann_middle")
    assert_close(ours.explain(batch, target=targets).attributions, theirs)


def test_input_x_gradient_equals_captum(batch):
    model = seeded(ModuleReluNet())
    targets = torch.tensor([3, 0, 1])
    ours = explainers.create("input_x_gradient", model).explain(batch, target=targets).attributions
    assert_close(ours, InputXGradient(model).attribute(batch.clone(), target=targets))


def test_smoothgrad_equals_captum_with_the_same_noise(batch):
    model = seeded(ModuleReluNet())
    row = batch[:1]
    stdev = 0.2 * float(row.max() - row.min())
    torch.manual_seed(11)
    ours = explainers.create("smoothgrad", model, samples=6, noise=0.2).explain(row, target=2).attributions
    torch.manual_seed(11)
    theirs = NoiseTunnel(Saliency(model)).attribute(row.clone(), nt_type="smoothgrad", nt_samples=6, stdevs=stdev, target=2, abs=False)
    assert_close(ours, theirs)


def test_occlusion_equals_captum(batch):
    model = seeded(ModuleReluNet())
    ours = explainers.create("occlusion", model, window=4, stride=2).explain(batch, target=1).attributions
    theirs = Occlusion(model).attribute(batch, sliding_window_shapes=(3, 4, 4), strides=(3, 2, 2), baselines=0.0, target=1,
                                         perturbations_per_eval=16)
    assert_close(ours, theirs)


@pytest.mark.parametrize("layer", [None, "block1.conv2"])
def test_grad_cam_equals_captum_upsampled_bilinearly(batch, layer):
    model = seeded(TinyResNet())
    targets = torch.tensor([2, 0, 1])
    options = {} if layer is None else {"layer": layer}
    ours = explainers.create("grad_cam", model, **options).explain(batch, target=targets).attributions
    # By default the last feature map the output depends on: the last residual block's output.
    module = model.get_submodule(layer or "block2")
    theirs = LayerGradCam(model, module).attribute(batch, target=targets, relu_attributions=True)
    theirs = LayerAttribution.interpolate(theirs, (16, 16), interpolate_mode="bilinear")
    assert ours.shape == (3, 1, 16, 16)
    assert_close(ours, theirs)


def test_guided_grad_cam_equals_captum(batch):
    model = seeded(ModuleReluNet())
    targets = torch.tensor([0, 3, 1])
    ours = explainers.create("guided_grad_cam", model, layer="features.5").explain(batch, target=targets).attributions
    theirs = GuidedGradCam(model, model.features[5]).attribute(batch.clone(), target=targets, interpolate_mode="bilinear")
    assert_close(ours, theirs)


class Linear(nn.Module):
    """score_k(x) = Σ w_k · x: every method has a closed form here."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.arange(2 * 12, dtype=torch.float32).reshape(2, 1, 3, 4) / 10 - 1)

    def forward(self, x):
        return (x.unsqueeze(1) * self.weight).sum(dim=(2, 3, 4))


def test_closed_forms_on_a_linear_model():
    model = Linear()
    x = torch.linspace(-1, 2, 12).reshape(1, 1, 3, 4)
    w = model.weight[1:2].detach()
    explain = lambda name, **o: explainers.create(name, model, **o).explain(x, target=1).attributions  # noqa: E731
    torch.testing.assert_close(explain("saliency"), w)
    torch.testing.assert_close(explain("input_x_gradient"), w * x)
    torch.testing.assert_close(explain("integrated_gradients", n_steps=8, baseline=0.5), w * (x - 0.5))
    # A 1x1 window at stride 1 removes exactly one pixel's contribution w·x.
    torch.testing.assert_close(explain("occlusion", window=1, stride=1), w * x)
    # No activation anywhere: guided backprop and deconvnet would be the plain gradient under their
    # names, so they refuse the model (HTTP 422) instead.
    for method in ("guided_backprop", "deconvnet"):
        with pytest.raises(explainers.errors.UnsupportedModelError, match="plain gradient"):
            explain(method)
    with pytest.raises(explainers.errors.UnsupportedModelError, match="spatial extent"):  # no layer either
        explain("grad_cam")


def test_one_forward_serves_every_gradient_rule_method(batch):
    model = seeded(TinyResNet())
    # The first call also verifies the trace and finds Grad-CAM's default layer, once per model.
    explainers.predict_and_explain(model, batch, sorted(GRADIENT_RULE_METHODS))
    calls = []
    handle = model.stem.register_forward_hook(lambda *_: calls.append(1))
    try:
        logits, maps = explainers.predict_and_explain(model, batch, sorted(GRADIENT_RULE_METHODS))
    finally:
        handle.remove()
    assert len(calls) == 1
    assert set(maps) == GRADIENT_RULE_METHODS
    with torch.no_grad():
        torch.testing.assert_close(logits, model(batch))
    assert all(m.target.tolist() == logits.argmax(1).tolist() for m in maps.values())


def test_path_methods_use_the_targets_of_the_shared_forward(batch):
    model = seeded(ModuleReluNet())
    logits, maps = explainers.predict_and_explain(
        model, batch, ["guided_backprop", "integrated_gradients"], integrated_gradients={"n_steps": 8})
    assert maps["integrated_gradients"].target.tolist() == logits.argmax(1).tolist()
    alone = explainers.create("integrated_gradients", model, n_steps=8).explain(batch).attributions
    assert_close(maps["integrated_gradients"].attributions, alone)


def test_prediction_only_when_no_method_is_asked(batch):
    model = seeded(ModuleReluNet())
    logits, maps = explainers.predict_and_explain(model, batch, [])
    assert maps == {}
    with torch.no_grad():
        torch.testing.assert_close(logits, model(batch))
