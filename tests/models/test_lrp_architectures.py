"""LRP on real torchvision architectures (random weights): ResNets and VGG are explained by every
composite, equal input x gradient in the epsilon -> 0 limit, conserve the logit where no bias
absorbs relevance, and leave the model alone; squeeze-excitation networks and vision transformers
are refused naming the operation."""

from __future__ import annotations

import pytest
import torch

import explainers
from explainers.errors import UnsupportedOperationError
from support.zoo import ModelFingerprint, build_torchvision

torchvision = pytest.importorskip("torchvision", reason="torchvision is in the test extra; without it there are no models to test")

COMPOSITES = ("epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_plus_flat")
# name -> (layer sites: convolutions with their batch norms merged, and linear layers; residual sums)
SUPPORTED = {"resnet18": (21, 8), "resnet50": (54, 16), "vgg11": (11, 0)}
SIZE = 32


@pytest.fixture(scope="module", params=sorted(SUPPORTED))
def built(request):
    model, _ = build_torchvision(request.param, SIZE)
    yield request.param, model
    del model


def noise(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_every_composite_explains_the_architecture_and_leaves_it_alone(built):
    name, model = built
    inputs = noise(SIZE, batch=1)
    fingerprint = ModelFingerprint(model)
    layers, sums = SUPPORTED[name]
    for composite in COMPOSITES:
        explanation = explainers.create("lrp", model, composite=composite).explain(inputs)
        assert explanation.attributions.shape == inputs.shape
        assert torch.isfinite(explanation.attributions).all() and explanation.attributions.abs().max() > 0
        sites = dict(explanation.rule_sites)
        assert sites.pop("sum", 0) == sums
        assert sum(sites.values()) == layers, (composite, explanation.rule_sites)
    assert not fingerprint.differences(model)


def test_epsilon_tends_to_input_times_gradient(built):
    # The LRP-0 identity on a ReLU network: epsilon-LRP with a vanishing epsilon is x * gradient,
    # batch norms merged and residual sums split in proportion included.
    name, model = built
    inputs = noise(SIZE, seed=1)
    ours = explainers.create("lrp", model, composite="epsilon", epsilon=1e-12).explain(inputs).attributions
    x_grad = explainers.create("input_x_gradient", model).explain(inputs).attributions
    assert float((ours - x_grad).abs().max()) <= 1e-4 * float(x_grad.abs().max())


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_epsilon_conserves_the_logit_less_the_classifier_bias(name):
    # torchvision's own initialisation: batch norms at identity statistics, no convolution bias;
    # only the classifier's bias (and VGG's, zero at init) takes relevance: sum R = logit - b_target.
    torch.manual_seed(3)
    model = torchvision.models.get_model(name, weights=None).eval()
    inputs = noise(SIZE, seed=2)
    explanation = explainers.create("lrp", model, composite="epsilon").explain(inputs)
    classifier = model.fc if hasattr(model, "fc") else model.classifier[-1]
    with torch.no_grad():
        logits = model(inputs).gather(1, explanation.target.view(-1, 1)).flatten()
        expected = logits - classifier.bias[explanation.target]
    total = explanation.attributions.sum(dim=(1, 2, 3))
    relative = ((total - expected).abs() / expected.abs()).max()
    assert relative <= 1e-3, (total, expected)


@pytest.mark.parametrize("name, operation", [("mobilenet_v3_small", "hardsigmoid"), ("efficientnet_b0", "sigmoid"),
                                             ("vit_b_16", "addmm")])
def test_gated_and_attention_architectures_are_refused(name, operation):
    model, size = build_torchvision(name)
    fingerprint = ModelFingerprint(model)
    with pytest.raises(UnsupportedOperationError) as caught:
        explainers.create("lrp", model).explain(noise(size, batch=1))
    assert caught.value.operation == operation and caught.value.http_status == 422
    if name != "vit_b_16":
        assert "squeeze-excitation" in str(caught.value)
    else:  # its layer norms have a rule (scale held constant); attention has none
        assert "layer_norm" not in str(caught.value)
    assert not fingerprint.differences(model)
