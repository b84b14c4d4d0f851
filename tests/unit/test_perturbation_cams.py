"""Score-CAM and Ablation-CAM: against plain per-channel loops (one forward per channel, a hook that
zeroes the channel in the layer's own layout), on models whose answer is known by construction,
and their stated cost."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import explainers
from support import cam_references as ref
from support.cam_references import assert_close
from explainers.kernels import capture
from support.models import ChannelsLastNet, ModuleReluNet, TinyResNet, TokenNet, UntraceableNet, seeded


def plain_score_cam(model, x, target: int, A):
    """One row; every channel: upsample, min-max to [0, 1], mask the input, target logit; softmax."""
    scores = []
    for k in range(A.shape[1]):
        mask = ref.upsample(A[:, k:k + 1], x.shape[-2:])
        spread = mask.max() - mask.min()
        mask = (mask - mask.min()) / spread if spread > 0 else torch.zeros_like(mask)
        with torch.no_grad():
            scores.append(float(explainers.logits_of(model(x * mask))[0, target]))
    weights = torch.softmax(torch.tensor(scores), dim=0)
    return ref.upsample(torch.relu((weights[None, :, None, None] * A).sum(dim=1, keepdim=True)), x.shape[-2:])


def hooked_activation(model, x, layer: str) -> torch.Tensor:
    """The layer's output at its last call, copied before anything after it can change it in place."""
    captured = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda _m, _a, out: captured.append(out.clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return captured[-1]


def plain_ablation_cam(model, x, target: int, layer: str, layout: str, prefix: int):
    module = dict(model.named_modules())[layer]
    with torch.no_grad():
        y = float(explainers.logits_of(model(x))[0, target])
    A = ref.as_nchw(hooked_activation(model, x, layer), layout, prefix)
    weights = []
    for k in range(A.shape[1]):
        def zero(_module, _args, output, k=k):
            output = output.clone()
            if layout == "nchw":
                output[:, k] = 0
            elif layout == "nhwc":
                output[..., k] = 0
            else:
                output[:, prefix:, k] = 0
            return output
        handle = module.register_forward_hook(zero)
        try:
            with torch.no_grad():
                weights.append((y - float(explainers.logits_of(model(x))[0, target])) / abs(y))
        finally:
            handle.remove()
    weights = torch.tensor(weights)
    return ref.upsample(torch.relu((weights[None, :, None, None] * A).sum(dim=1, keepdim=True)), x.shape[-2:])


CASES = [
    (ModuleReluNet, "features.1", "nchw", 0),
    (ModuleReluNet, "features.6", "nchw", 0),
    (TinyResNet, "block2", "nchw", 0),
    (ChannelsLastNet, "act", "nhwc", 0),
    (TokenNet, "block", "tokens", 1),
    (UntraceableNet, "conv3", "nchw", 0),   # the fallback path: the model's own modules, hooks feed the capture
]


@pytest.mark.parametrize("model_class, layer, layout, prefix", CASES, ids=[f"{c[0].__name__}-{c[1]}" for c in CASES])
def test_score_and_ablation_cam_equal_the_plain_loops(model_class, layer, layout, prefix):
    model = seeded(model_class())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    options = {"layer": layer, "max_channels": 64, "batch_size": 3}
    _, explanations = explainers.predict_and_explain(model, x, ["score_cam", "ablation_cam"],  # top-1 classes
                                                     score_cam=options, ablation_cam=options)
    targets = explanations["score_cam"].target.tolist()
    scores, ablations = [], []
    for row, target in enumerate(targets):
        A = ref.as_nchw(hooked_activation(model, x[row:row + 1], layer), layout, prefix)
        scores.append(plain_score_cam(model, x[row:row + 1], target, A))
        ablations.append(plain_ablation_cam(model, x[row:row + 1], target, layer, layout, prefix))
    score, ablation = torch.cat(scores), torch.cat(ablations)
    assert score.abs().max() > 0 and ablation.abs().max() > 0  # (a row's map may be 0: every weight negative)
    assert_close(explanations["score_cam"].attributions, score)
    assert_close(explanations["ablation_cam"].attributions, ablation, rtol=1e-3)


class SummedChannels(nn.Module):
    """``y = Σ_k c_k Σ_ij A_k + b`` with ``A = ReLU(conv(x))``: zeroing channel k lowers y by ``c_k S_k``."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.coefficients = nn.Parameter(torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, 1.0, 1.0]]))
        self.bias = nn.Parameter(torch.tensor([3.0, 0.0]))

    def forward(self, x):
        return self.features(x).sum(dim=(2, 3)) @ self.coefficients.T + self.bias


def test_ablation_cam_on_a_model_known_by_construction():
    model = seeded(SummedChannels())
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        A = model.features(x)
        y = float(model(x)[0, 0])
    weights = model.coefficients.detach()[0] * A.sum(dim=(2, 3))[0] / abs(y)  # (y - y_k) / |y|
    expected = torch.relu((weights[None, :, None, None] * A).sum(dim=1, keepdim=True))
    ours = explainers.create("ablation_cam", model, layer="features").explain(x, target=0).attributions
    assert_close(ours, expected, rtol=1e-4)
    # max_channels=1: only the channel of highest mean activation is weighed.
    top = int(A.mean(dim=(2, 3))[0].argmax())
    only = torch.relu(weights[top] * A[:, top:top + 1])
    ours = explainers.create("ablation_cam", model, layer="features", max_channels=1).explain(x, target=0).attributions
    assert_close(ours, only, rtol=1e-4)


class Masked(nn.Module):
    """``layer`` is the input (2 channels); logit 0 is the sum of channel 0, logit 1 of channel 1."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Identity()

    def forward(self, x):
        return self.layer(x).sum(dim=(2, 3))


def test_score_cam_on_a_model_known_by_construction():
    # Channel 0 is 10 on a 2x2 square, 0 elsewhere: as a mask it keeps the square, score 40.
    # Channel 1 is constant: its mask is 0, score 0. Weights softmax([40, 0]), map 1·A_0 + e^-40·A_1.
    x = torch.zeros(1, 2, 6, 6)
    x[0, 0, 1:3, 2:4] = 10.0
    x[0, 1] = 0.5
    ours = explainers.create("score_cam", Masked(), layer="layer").explain(x, target=0).attributions
    weights = torch.softmax(torch.tensor([40.0, 0.0]), dim=0)
    assert_close(ours, weights[0] * x[:, :1] + weights[1] * x[:, 1:])
    assert ours[0, 0, 1, 2] == pytest.approx(10.0, rel=1e-6)


@pytest.mark.parametrize("name", ["score_cam", "ablation_cam"])
def test_stated_cost_is_max_channels_until_the_layer_is_known(name):
    model = seeded(ModuleReluNet())  # features.6 has 8 channels
    explainer = explainers.create(name, model, layer="features.6", max_channels=20, batch_size=6)
    assert explainer.cost(16, 16).evaluations == 20  # before any explanation: the upper bound
    explainer.explain(torch.randn(1, 3, 16, 16), target=0)
    again = explainers.create(name, model, layer="features.6", max_channels=20, batch_size=6)
    cost = again.cost(16, 16)
    assert (cost.evaluations, cost.rows_per_forward, cost.backward_passes) == (8, 6, 0)
    assert (cost.evaluations_option, cost.batch_option) == ("max_channels", "batch_size")
    assert again.cost(32, 32).evaluations == 20  # another input size: not known yet


@pytest.mark.parametrize("options", [{"max_channels": 0}, {"batch_size": -1}, {"max_channels": True}])
def test_bad_options_are_refused(options):
    for name in ("score_cam", "ablation_cam"):
        with pytest.raises(explainers.InvalidOptionError):
            explainers.create(name, ModuleReluNet(), **options)


class FailsWhenArmed(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls_left = None

    def forward(self, x):
        if self.calls_left is not None:
            if self.calls_left == 0:
                raise RuntimeError("injected failure")
            self.calls_left -= 1
        return x


def test_a_failure_inside_the_ablation_forwards_leaves_no_hook_and_no_capture():
    model = seeded(UntraceableNet())
    tripwire = FailsWhenArmed()
    model.fc = nn.Sequential(tripwire, model.fc)
    x = torch.randn(1, 3, 16, 16)
    options = {"layer": "conv3", "max_channels": 6, "batch_size": 2}
    expected = explainers.create("ablation_cam", model, **options).explain(x, target=1).attributions
    tripwire.calls_left = 2  # the shared forward and the first ablation batch pass, the second fails
    with pytest.raises(RuntimeError, match="injected failure"):
        explainers.create("ablation_cam", model, **options).explain(x, target=1)
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())
    assert capture._ACTIVE_CAPTURE.get() is None
    tripwire.calls_left = None
    assert torch.equal(explainers.create("ablation_cam", model, **options).explain(x, target=1).attributions, expected)
