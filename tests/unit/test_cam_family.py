"""The CAM family against the formulas written out (support.cam_references) from A and G taken by a
hook on the model's own forward, on small CNNs at several layers, a channels-last map and a token grid."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import explainers
from support import cam_references as ref
from support.cam_references import assert_close
from support.models import ChannelsLastNet, ModuleReluNet, TinyResNet, TokenNet, seeded

GRADIENT_CAMS = sorted(ref.GRADIENT_CAMS)


CASES = [
    (ModuleReluNet, "features.1", "nchw", 0),   # post-ReLU, at input resolution
    (ModuleReluNet, "features.3", "nchw", 0),   # a convolution: signed activations
    (ModuleReluNet, "features.6", "nchw", 0),   # the last ReLU
    (ModuleReluNet, "features", "nchw", 0),     # a container
    (TinyResNet, "block1", "nchw", 0),          # a residual block
    (ChannelsLastNet, "act", "nhwc", 0),
    (TokenNet, "block", "tokens", 1),
]


@pytest.fixture
def batch():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("model_class, layer, layout, prefix", CASES, ids=[f"{c[0].__name__}-{c[1]}" for c in CASES])
def test_each_cam_equals_its_formula(model_class, layer, layout, prefix, batch):
    model = seeded(model_class())
    targets = torch.tensor([0, 2, 3])
    names = sorted(ref.CAMS)
    _, explanations = explainers.predict_and_explain(model, batch, names, target=targets,
                                                     **{name: {"layer": layer} for name in names})
    raw_a, raw_g, _ = ref.hooked_activation_and_gradient(model, batch, targets, layer)
    A, G = ref.as_nchw(raw_a, layout, prefix), ref.as_nchw(raw_g, layout, prefix)
    for name in names:
        expected = ref.upsample(ref.CAMS[name](A, G), batch.shape[-2:])
        assert expected.abs().max() > 0, name  # a zero map would compare equal to anything small
        explanation = explanations[name]
        assert explanation.layer == layer and explanation.attributions.shape == (3, 1, 16, 16)
        assert_close(explanation.attributions, expected, rtol=2e-4 if name == "eigen_cam" else 1e-4)


def test_the_methods_give_different_maps(batch):
    """The formulas are not interchangeable on the test model: a wrong one would be caught."""
    model = seeded(ModuleReluNet())
    names = sorted(ref.CAMS)
    _, explanations = explainers.predict_and_explain(model, batch, names, target=1,
                                                     **{name: {"layer": "features.6"} for name in names})
    for first, second in itertools.combinations(names, 2):
        a, b = (explanations[name].attributions for name in (first, second))
        a, b = a / a.amax(dim=(2, 3), keepdim=True), b / b.amax(dim=(2, 3), keepdim=True)
        assert (a - b).abs().max() > 0.05, (first, second)


def test_gradient_cams_share_one_backward_to_the_layer(batch, monkeypatch):
    model = seeded(ModuleReluNet())
    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda outputs, inputs, *a, **k: calls.append(inputs) or grad(outputs, inputs, *a, **k))
    explainers.predict_and_explain(model, batch, GRADIENT_CAMS, **{name: {"layer": "features.6"} for name in GRADIENT_CAMS})
    assert len(calls) == 1
    calls.clear()
    explainers.predict_and_explain(model, batch, [*GRADIENT_CAMS, "guided_grad_cam", "eigen_cam"],
                                   **{name: {"layer": "features.6"} for name in [*GRADIENT_CAMS, "guided_grad_cam", "eigen_cam"]})
    assert len(calls) == 2  # the shared one to the layer, guided backprop's to the input
    calls.clear()
    explainers.predict_and_explain(model, batch, ["normgrad"], normgrad={"layers": ["features.1", "features.6"]})
    assert len(calls) == 1  # both layers' gradients from one backward


def test_gradient_cams_state_a_backward_to_the_layer():
    model = seeded(ModuleReluNet())
    for name in GRADIENT_CAMS:
        cost = explainers.create(name, model).cost(16, 16)
        assert (cost.evaluations, cost.backward_passes, cost.backward_to_layer) == (0, 1, True), name
    assert explainers.create("eigen_cam", model).cost(16, 16).backward_passes == 0


# --- NormGrad -----------------------------------------------------------------------------------


class TwoByTwo(nn.Module):
    """``layer`` is the identity on a 2-channel 2x2 input; the logits are a fixed linear map of it."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Identity()
        self.head = nn.Linear(8, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[3.0, 0.0, 1.0, 2.0, 4.0, 0.0, 0.0, 2.0],
                                                 [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]))

    def forward(self, x):
        return self.head(self.layer(x).flatten(1))


def test_normgrad_by_hand():
    # Channel 0 is [[1, 2], [0, 3]], channel 1 is [[4, 0], [0, 4]]: the activation's norms per position
    # are [[sqrt(17), 2], [0, 5]]. The gradient of logit 0 is its weight row: channel 0 [[3, 0], [1, 2]],
    # channel 1 [[4, 0], [0, 2]], norms [[5, 0], [1, sqrt(8)]].
    x = torch.tensor([[[[1.0, 2.0], [0.0, 3.0]], [[4.0, 0.0], [0.0, 4.0]]]])
    normgrad = explainers.create("normgrad", TwoByTwo(), layer="layer").explain(x, target=0).attributions
    expected = torch.tensor([[[[17 ** 0.5 * 5, 0.0], [0.0, 5 * 8 ** 0.5]]]])
    torch.testing.assert_close(normgrad, expected)


@pytest.mark.parametrize("combine", ["product", "sum"])
def test_normgrad_over_several_layers(combine, batch):
    model = seeded(ModuleReluNet())
    layers = ["features.1", "features.3", "features.6"]
    ours = explainers.create("normgrad", model, layers=layers, combine=combine).explain(batch, target=2)
    maps = []
    for layer in layers:
        A, G, _ = ref.hooked_activation_and_gradient(model, batch, torch.tensor([2, 2, 2]), layer)
        layer_map = ref.upsample(ref.normgrad(A, G), (16, 16))
        maps.append(layer_map / layer_map.amax(dim=(2, 3), keepdim=True))
    expected = maps[0] * maps[1] * maps[2] if combine == "product" else (maps[0] + maps[1] + maps[2]) / 3
    assert ours.layer == "features.1,features.3,features.6"
    assert_close(ours.attributions, expected)


@pytest.mark.parametrize("options", [{"layer": "features", "layers": ["features"]}, {"layers": []},
                                     {"layers": ["a", "a"]}, {"layers": "features"}, {"combine": "max"}])
def test_normgrad_refuses_bad_options(options):
    with pytest.raises(explainers.InvalidOptionError):
        explainers.create("normgrad", ModuleReluNet(), **options)


# --- Eigen-CAM ----------------------------------------------------------------------------------


class Through(nn.Module):
    """``layer`` is the input itself, so the test chooses the activation."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Identity()
        self.head = nn.Linear(3 * 8 * 8, 2)

    def forward(self, x):
        return self.head(self.layer(x).flatten(1))


def _blob(sign: float = 1.0) -> torch.Tensor:
    noise = 0.05 * torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    blob = torch.zeros(1, 3, 8, 8)
    blob[..., 2:5, 3:6] = torch.tensor([1.0, 2.0, 1.5])[:, None, None]
    return sign * (blob + noise)


def test_eigen_cam_sign_follows_the_activation_norm():
    # The first principal component separates the blob from the background; our sign puts the
    # positive lobe where the activation's norm over channels is high: the blob.
    model = seeded(Through())
    cam = explainers.create("eigen_cam", model, layer="layer").explain(_blob(), target=0).attributions[0, 0]
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:5, 3:6] = True
    assert cam[inside].min() > 0 and cam[~inside].max() == 0
    # Negated activations (a signed layer): the blob still carries the strongest responses, so the
    # map stays on it; a sign from the mean activation would put it on the background.
    flipped = explainers.create("eigen_cam", model, layer="layer").explain(_blob(-1.0), target=0).attributions[0, 0]
    assert flipped[inside].min() > 0 and flipped[~inside].max() == 0
    # Not class-specific: another target gives the same map.
    other = explainers.create("eigen_cam", model, layer="layer").explain(_blob(), target=1).attributions[0, 0]
    assert torch.equal(cam, other)


def test_eigen_cam_sign_without_a_norm_signal_puts_the_largest_entry_positive():
    from explainers.methods.cam_family import principal_projection

    # Integer vectors of norm exactly 5 at every position: no position responds more than another.
    vectors = torch.tensor([[3.0, 4.0], [4.0, -3.0], [-5.0, 0.0], [0.0, 5.0], [-3.0, -4.0], [4.0, 3.0]])
    chosen = torch.randint(0, len(vectors), (25,), generator=torch.Generator().manual_seed(2))
    activation = vectors[chosen].T.reshape(1, 2, 5, 5)
    projection = principal_projection(activation).flatten()
    assert projection[projection.abs().argmax()] > 0
    samples = activation.reshape(2, 25).T.double()
    centred = samples - samples.mean(dim=0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # eigenvalues ascending: the last is the first PC
    reference = (centred @ vectors[:, -1]).abs().float()
    assert_close(projection.abs(), reference)
