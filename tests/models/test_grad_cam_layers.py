"""Grad-CAM and Guided Grad-CAM at named layers of real architectures (containers, residual
blocks, activations, a vision transformer's token sequence, a Swin channels-last map), each
against a hand computation: the layer's output captured by a forward hook on the model's own
forward, its gradient by autograd, weights the spatial mean of the gradient, ReLU of the weighted
sum, bilinear upsampling to the input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import explainers
from support.battery import REFERENCE_RTOL, noise_inputs, relative_difference
from support.cam_references import as_nchw, hooked_activation_and_gradient
from support.reference_rules import explicit_rule_attribution
from support.zoo import ModelFingerprint, build_torchvision

pytest.importorskip("torchvision", reason="torchvision is in the test extra; without it there are no models to test")


def hand_grad_cam(model, inputs, targets, layer: str, layout: str = "nchw", prefix_tokens: int = 0):
    """Grad-CAM written out: the layer's output at its last call in the model's own forward."""
    activation, gradient, _ = hooked_activation_and_gradient(model, inputs, targets, layer)
    activation = as_nchw(activation, layout, prefix_tokens)
    gradient = as_nchw(gradient, layout, prefix_tokens)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False), cam.shape[-2:]


@pytest.fixture(scope="module")
def resnet18():
    return build_torchvision("resnet18", 96)[0]


@pytest.fixture(scope="module")
def mobilenet_v2():
    return build_torchvision("mobilenet_v2", 96)[0]


@pytest.fixture(scope="module")
def vit_b_16():
    return build_torchvision("vit_b_16", 64)[0]   # a 4x4 grid of patches and a class token


@pytest.fixture(scope="module")
def swin_t():
    return build_torchvision("swin_t", 64)[0]


CASES = [
    ("resnet18", "layer4", "nchw", 0),            # a container (nn.Sequential)
    ("resnet18", "layer4.1", "nchw", 0),          # a residual block
    ("resnet18", "layer3.1.relu", "nchw", 0),     # an in-place nn.ReLU called twice per block: its last call
    ("resnet18", "layer3.0.conv2", "nchw", 0),    # a convolution whose batch norm and residual add follow
    ("mobilenet_v2", "features.8", "nchw", 0),    # an inverted residual block
    ("mobilenet_v2", "features.18", "nchw", 0),   # the last Conv2dNormActivation (in-place ReLU6)
    ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1", "tokens", 1),  # tokens, class token dropped
    ("vit_b_16", "encoder.layers.encoder_layer_10", "tokens", 1),
    ("swin_t", "features.5", "nhwc", 0),          # a Swin stage: channels-last [B, H, W, C]
]


@pytest.mark.parametrize(("model_name", "layer", "layout", "prefix_tokens"), CASES,
                         ids=[f"{case[0]}-{case[1]}" for case in CASES])
def test_grad_cam_at_a_named_layer_equals_the_hand_computation(request, model_name, layer, layout, prefix_tokens):
    model = request.getfixturevalue(model_name)
    size = 64 if model_name in ("vit_b_16", "swin_t") else 96
    inputs = noise_inputs(size, batch=2, seed=3)
    with torch.no_grad():
        logits = explainers.logits_of(model(inputs))
    targets = torch.stack([logits[0].argmax(), logits[1].argmin()])
    fingerprint = ModelFingerprint(model)
    _, explanations = explainers.predict_and_explain(
        model, inputs, ["grad_cam", "guided_grad_cam"], target=targets,
        grad_cam={"layer": layer}, guided_grad_cam={"layer": layer})
    assert not fingerprint.differences(model)

    expected, grid = hand_grad_cam(model, inputs, targets, layer, layout, prefix_tokens)
    assert grid[0] > 1 and grid[1] > 1, "a 1x1 map would make this comparison vacuous"
    assert expected.abs().max() > 0, "the hand Grad-CAM is empty: pick inputs or a layer with a signal"
    cam = explanations["grad_cam"]
    assert cam.layer == layer
    assert relative_difference(cam.attributions, expected) <= REFERENCE_RTOL

    guided, _ = explicit_rule_attribution(model, inputs, targets, "guided_backprop", copy_model=False)
    assert relative_difference(explanations["guided_grad_cam"].attributions, guided * expected) <= REFERENCE_RTOL


def test_default_layer_of_a_residual_network_is_its_last_feature_map(resnet18):
    inputs = noise_inputs(96, batch=1, seed=5)
    _, explanations = explainers.predict_and_explain(resnet18, inputs, ["grad_cam"])
    expected, _ = hand_grad_cam(resnet18, inputs, explanations["grad_cam"].target, "layer4")
    assert relative_difference(explanations["grad_cam"].attributions, expected) <= REFERENCE_RTOL


def test_default_layer_of_a_vision_transformer_is_not_the_patch_embedding(vit_b_16):
    _, explanations = explainers.predict_and_explain(vit_b_16, noise_inputs(64), ["grad_cam"])
    cam = explanations["grad_cam"]
    assert cam.layer is not None and cam.layer != "conv_proj"
    assert cam.attributions.abs().max() > 0


def test_a_layer_that_does_not_feed_the_output_is_a_typed_error():
    googlenet, size = build_torchvision("googlenet")
    with pytest.raises(explainers.PluginError):   # the auxiliary head does not run in eval mode
        explainers.predict_and_explain(googlenet, noise_inputs(size), ["grad_cam"], grad_cam={"layer": "aux1"})


# The rest of the CAM family at a representative subset of the layers above (a container, a signed
# convolution output, an inverted residual block, ViT tokens, a Swin channels-last map): every method
# at every case would add a minute to the battery for no new code path (the formulas are checked on
# many more layers of small models in tests/unit/test_cam_family.py).
FAMILY_CASES = [CASES[0], CASES[3], CASES[4], CASES[6], CASES[8]]


@pytest.mark.parametrize(("model_name", "layer", "layout", "prefix_tokens"), FAMILY_CASES,
                         ids=[f"{case[0]}-{case[1]}" for case in FAMILY_CASES])
def test_the_cam_family_at_a_named_layer_equals_the_formulas(request, model_name, layer, layout, prefix_tokens):
    from support import cam_references as ref

    model = request.getfixturevalue(model_name)
    size = 64 if model_name in ("vit_b_16", "swin_t") else 96
    inputs = noise_inputs(size, batch=2, seed=3)
    with torch.no_grad():
        logits = explainers.logits_of(model(inputs))
    targets = torch.stack([logits[0].argmax(), logits[1].argmin()])
    names = sorted(ref.CAMS)
    fingerprint = ModelFingerprint(model)
    _, explanations = explainers.predict_and_explain(model, inputs, names, target=targets,
                                                     **{name: {"layer": layer} for name in names})
    assert not fingerprint.differences(model)
    raw_a, raw_g, _ = ref.hooked_activation_and_gradient(model, inputs, targets, layer)
    A, G = ref.as_nchw(raw_a, layout, prefix_tokens), ref.as_nchw(raw_g, layout, prefix_tokens)
    for name in names:
        expected = ref.upsample(ref.CAMS[name](A, G), inputs.shape[-2:])
        assert expected.abs().max() > 0, name
        assert explanations[name].layer == layer
        assert relative_difference(explanations[name].attributions, expected) <= REFERENCE_RTOL, name


@pytest.mark.parametrize("model_name, layer", [("vit_b_16", "encoder.layers.encoder_layer_10"), ("swin_t", "features.5")])
def test_score_and_ablation_cam_on_tokens_and_channels_last(request, model_name, layer):
    model = request.getfixturevalue(model_name)
    options = {"layer": layer, "max_channels": 4, "batch_size": 4}
    _, explanations = explainers.predict_and_explain(model, noise_inputs(64), ["score_cam", "ablation_cam"],
                                                     score_cam=options, ablation_cam=options)
    for explanation in explanations.values():
        assert explanation.attributions.shape == (1, 1, 64, 64) and torch.isfinite(explanation.attributions).all()
        assert explanation.attributions.min() >= 0
