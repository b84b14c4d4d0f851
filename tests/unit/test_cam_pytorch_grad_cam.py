"""Our CAMs against pytorch-grad-cam 1.5.7 (jacobgil), an independent implementation.

Why the comparison is exact: pytorch-grad-cam's public ``__call__`` applies ReLU, min-max scales
and resizes with OpenCV; we bypass that and read its map at the layer's own resolution from
``get_cam_image`` (its per-method formula) on the activations and gradients its own hooks
captured, apply the ReLU it applies, and upsample that with the bilinear interpolation ours uses.
Score-CAM upsamples its masks with ``align_corners=True`` where we use ``False``: it is compared at
a layer of the input's resolution, where both upsamplings are the identity. Ablation-CAM zeroes the
channel only at a layer whose smallest output is 0 (else it sets it to min - 1e7): it is compared
at ReLU outputs. Tolerances: pytorch-grad-cam adds 1e-6 (Grad-CAM++) and 1e-7 (XGrad-CAM) to
denominators we guard instead; the test model's logits are scaled by 100 so gradients are far
above that.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import explainers
from support.cam_references import upsample
from support.models import ModuleReluNet, seeded

pgc = pytest.importorskip("pytorch_grad_cam", reason="grad-cam is in the test extra (the reference implementation)")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

THEIRS = {
    "grad_cam": pgc.GradCAM, "grad_cam_plus_plus": pgc.GradCAMPlusPlus, "xgrad_cam": pgc.XGradCAM,
    "hires_cam": pgc.HiResCAM, "layer_cam": pgc.LayerCAM, "eigen_cam": pgc.EigenCAM,
}
LAYERS = ["features.1", "features.3", "features.4", "features.6"]


class Scaled(nn.Module):
    """ModuleReluNet with logits x100 (gradients well above pytorch-grad-cam's epsilons), shifted
    positive (Ablation-CAM: it divides by the logit, we by its magnitude, the same when positive)."""

    def __init__(self):
        super().__init__()
        net = seeded(ModuleReluNet())
        self.features, self.head = net.features, net.head

    def forward(self, x):
        return 100 * self.head(self.features(x)) + 20_000


@pytest.fixture(scope="module")
def model():
    return Scaled().eval()


@pytest.fixture(scope="module")
def batch():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(12))


TARGETS = [0, 2, 3]


def their_layer_map(cam_class, model, batch, layer: str) -> torch.Tensor:
    module = dict(model.named_modules())[layer]
    targets = [ClassifierOutputTarget(t) for t in TARGETS]
    cam = cam_class(model=model, target_layers=[module])
    try:
        cam(input_tensor=batch.clone(), targets=targets)  # runs its forward, hooks and backward
        activations = cam.activations_and_grads.activations[0].numpy()
        gradients = cam.activations_and_grads.gradients[0].numpy() if cam.uses_gradients else None
        image = cam.get_cam_image(batch, module, targets, activations, gradients, False)
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(np.asarray(image, dtype=np.float32))[:, None]


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", sorted(THEIRS))
def test_equals_pytorch_grad_cam(name, layer, model, batch):
    ours = explainers.create(name, model, layer=layer).explain(batch, target=TARGETS).attributions
    theirs = their_layer_map(THEIRS[name], model, batch, layer)
    if name == "eigen_cam":
        # Their SVD's sign is whatever LAPACK returns; ours is fixed (see principal_projection).
        # Each row's map is the positive part of one of the two signs.
        for row in range(len(TARGETS)):
            candidates = [upsample(torch.relu(sign * theirs[row:row + 1]), (16, 16)) for sign in (1, -1)]
            assert min(relative_difference(ours[row:row + 1], c) for c in candidates) < 1e-4, row
        return
    expected = upsample(torch.relu(theirs), (16, 16))
    assert expected.abs().max() > 0
    assert relative_difference(ours, expected) < 1e-4


def test_grad_cam_and_grad_cam_plus_plus_differ_here(model, batch):
    """A comparison that cannot pass by accident: the methods' maps differ on this model."""
    maps = {name: their_layer_map(THEIRS[name], model, batch, "features.6") for name in THEIRS if name != "eigen_cam"}
    assert relative_difference(torch.relu(maps["grad_cam"]) / maps["grad_cam"].max(),
                               torch.relu(maps["grad_cam_plus_plus"]) / maps["grad_cam_plus_plus"].max()) > 0.05


@pytest.mark.parametrize("layer", ["features.0", "features.1"])  # 16x16: no upsampling (see the module docstring)
def test_score_cam_equals_pytorch_grad_cam_at_input_resolution(layer, batch):
    model = seeded(ModuleReluNet()).eval()  # unscaled logits: a softmax over channels far from one-hot
    module = dict(model.named_modules())[layer]
    cam = pgc.ScoreCAM(model=model, target_layers=[module])
    try:
        cam(input_tensor=batch.clone(), targets=[ClassifierOutputTarget(t) for t in TARGETS])
        activations = cam.activations_and_grads.activations[0].numpy()
        weights = cam.get_cam_weights(batch, module, [ClassifierOutputTarget(t) for t in TARGETS], activations, None)
    finally:
        cam.activations_and_grads.release()
    assert weights.max(axis=1).min() < 0.7  # several channels count: a wrong score or mask would show
    expected = torch.relu((torch.from_numpy(weights)[:, :, None, None] * torch.from_numpy(activations)).sum(1, keepdim=True))
    ours = explainers.create("score_cam", model, layer=layer).explain(batch, target=TARGETS).attributions
    assert relative_difference(ours, expected) < 1e-4


@pytest.mark.parametrize("layer", ["features.1", "features.4", "features.6"])
def test_ablation_cam_equals_pytorch_grad_cam(layer, model, batch):
    module = dict(model.named_modules())[layer]
    targets = [ClassifierOutputTarget(t) for t in TARGETS]
    cam = pgc.AblationCAM(model=model, target_layers=[module], batch_size=5)
    try:
        cam(input_tensor=batch.clone(), targets=targets)
        activations = cam.activations_and_grads.activations[0].numpy()
        assert activations.min() == 0  # a ReLU output: pytorch-grad-cam zeroes the channel as we do
        weights = cam.get_cam_weights(batch, module, targets, activations, None)
    finally:
        cam.activations_and_grads.release()
    layer_map = torch.relu((torch.from_numpy(weights)[:, :, None, None] * torch.from_numpy(activations)).sum(1, keepdim=True))
    ours = explainers.create("ablation_cam", model, layer=layer, batch_size=5).explain(batch, target=TARGETS).attributions
    assert relative_difference(ours, upsample(layer_map, (16, 16))) < 1e-4
