"""Small timm models of many families, random weights (pretrained=False): every method runs and
leaves the model alone, rule sites are those the explicit-rule reference counts, and guided
backprop and DeconvNet equal that reference. timm's own activations that our contract does not
cover (custom autograd Functions, activations written with a sigmoid gate) must be refused, not
answered with the plain gradient."""

from __future__ import annotations

import re

import pytest
import torch

import explainers
from explainers.errors import UnsupportedModelError
from support.battery import noise_inputs, reference_problems, reference_sites, smoke_problems
from support.zoo import build_timm

pytest.importorskip("timm", reason="timm is in the test extra; without it there are no timm models to test")

# (model, input side, builder options): one small variant per family, at the smallest input each takes.
TIMM_MODELS = [
    ("resnet10t", 32, {}),                                    # ReLU, timm's ResNet
    ("resnet18d", 32, {"act_layer": "prelu"}),                # timm's PReLU module (F.prelu)
    ("resnet10t.mish", 32, {"act_layer": "mish"}),            # nn.Mish through timm's factory
    ("efficientnet_b0", 32, {}),                              # SiLU, sigmoid squeeze-excitation gates
    ("mobilenetv3_small_050", 32, {}),                        # Hardswish, ReLU, hard-sigmoid gates
    ("lcnet_050", 32, {}),                                    # Hardswish
    ("mixnet_s", 32, {}),                                     # SiLU and ReLU, mixed kernels
    ("rexnet_100", 32, {}),                                   # SiLU, ReLU6, ReLU
    ("ghostnet_050", 32, {}),                                 # ReLU, ghost modules, hard-sigmoid gates
    ("regnety_002", 32, {}),                                  # ReLU, squeeze-excitation
    ("dla46_c", 32, {}),                                      # ReLU, deep aggregation
    ("hrnet_w18_small", 64, {}),                              # ReLU, parallel resolutions
    ("tresnet_m", 64, {}),                                    # LeakyReLU (in place) and ReLU, space-to-depth stem
    ("nf_regnet_b0", 32, {}),                                 # normaliser-free, scaled SiLU and ReLU
    ("convnext_atto", 32, {}),                                # GELU, channels-last LayerNorm
    ("vit_tiny_patch16_224", 32, {"img_size": 32}),           # GELU, class token
    ("vit_tiny_patch16_224.gelu_tanh", 32, {"img_size": 32, "act_layer": "gelu_tanh"}),  # timm's GELUTanh
    ("deit_tiny_distilled_patch16_224", 32, {"img_size": 32}),  # class and distillation tokens
    ("cait_xxs24_224", 32, {"img_size": 32}),                 # class attention, layer scale
    ("swin_tiny_patch4_window7_224", 64, {"img_size": 64, "window_size": 4}),  # shifted windows
    ("levit_128s", 64, {"img_size": 64}),                     # Hardswish in attention, distillation head
    ("mobilevit_xxs", 64, {}),                                # SiLU, convolution and attention
    ("maxvit_rmlp_pico_rw_256", 64, {"img_size": 64}),        # SiLU, GELU, ReLU; MBConv and grid attention
    ("efficientvit_b0", 64, {}),                              # Hardswish, ReLU linear attention
    ("pvt_v2_b0", 64, {}),                                    # GELU after a depthwise convolution
    ("fastvit_t8", 64, {}),                                   # GELU, reparameterisable blocks
]

# timm activations outside the contract: HardMishMe is a custom autograd.Function, QuickGELU is
# x * sigmoid(1.702 x) (a gate). A model whose only activations are these has no rule site.
UNCOVERED = [
    ("resnet10t.hard_mish", 32, {"act_layer": "hard_mish"}),
    ("vit_tiny_patch16_224.quick_gelu", 32, {"img_size": 32, "act_layer": "quick_gelu"}),
]


def _build(name: str, size: int, options: dict):
    return build_timm(name.split(".")[0], size, **options)


@pytest.fixture(scope="module", params=TIMM_MODELS, ids=[entry[0] for entry in TIMM_MODELS])
def built(request):
    name, size, options = request.param
    yield name, _build(name, size, options), size


def test_every_method_runs_and_leaves_the_model_alone(built):
    name, model, size = built
    problems = smoke_problems(f"timm/{name}", model, size)
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


def test_rules_equal_the_explicit_rule_reference(built):
    name, model, size = built
    problems = reference_problems(f"timm/{name}", model, size)
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


def test_the_battery_covers_fifteen_families():
    families = {re.match(r"[a-z]+", name).group() for name, _, _ in TIMM_MODELS}
    assert len(families) >= 15, sorted(families)


@pytest.mark.parametrize(("name", "size", "options"), UNCOVERED, ids=[entry[0] for entry in UNCOVERED])
def test_activations_outside_the_contract_are_refused(name, size, options):
    model = _build(name, size, options)
    inputs = noise_inputs(size)
    assert reference_sites(model, inputs) == {}
    for method in ("guided_backprop", "deconvnet", "guided_grad_cam"):
        with pytest.raises(UnsupportedModelError):
            explainers.predict_and_explain(model, inputs, [method])
    _, explanations = explainers.predict_and_explain(model, inputs, ["saliency"])
    assert torch.isfinite(explanations["saliency"].attributions).all()
