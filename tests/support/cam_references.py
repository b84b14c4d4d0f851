"""The CAM family written out plainly from the papers, on ``A`` and ``G`` taken by a forward hook on the
model's own forward and autograd: nothing of explainers' ForwardRecord, capture or feature-map code."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import explainers


def hooked_activation_and_gradient(model, inputs, targets, layer: str):
    """The layer's output at its last call in ``model(inputs)``, and d(sum of target logits)/d it."""
    module = dict(model.named_modules())[layer]
    captured = []
    handle = module.register_forward_hook(lambda _module, _args, output: captured.append(output))
    try:
        with torch.enable_grad():
            logits = explainers.logits_of(model(inputs.clone()))
            (gradient,) = torch.autograd.grad(logits[torch.arange(len(targets)), targets].sum(), captured[-1])
    finally:
        handle.remove()
    return captured[-1].detach(), gradient.detach(), logits.detach()


def as_nchw(tensor: torch.Tensor, layout: str, prefix_tokens: int = 0) -> torch.Tensor:
    if layout == "nchw":
        return tensor
    if layout == "nhwc":
        return tensor.permute(0, 3, 1, 2)
    tokens = tensor[:, prefix_tokens:]
    side = int(round(tokens.shape[1] ** 0.5))
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def assert_close(actual, expected, rtol=1e-4):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()) + 1e-12)


def upsample(layer_map: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(layer_map, size=tuple(size), mode="bilinear", align_corners=False)


def _weighted(weights: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    cam = torch.zeros(activation.shape[0], 1, *activation.shape[2:], dtype=activation.dtype)
    for b in range(activation.shape[0]):
        for k in range(activation.shape[1]):
            cam[b, 0] += weights[b, k] * activation[b, k]
    return torch.relu(cam)


def grad_cam(A, G):
    return _weighted(G.mean(dim=(2, 3)), A)


def grad_cam_plus_plus(A, G):
    """Chattopadhay et al. 2018, eq. 19 with the ReLU of eq. 7, position by position."""
    weights = torch.zeros(A.shape[:2], dtype=torch.float64)
    for b in range(A.shape[0]):
        for k in range(A.shape[1]):
            total = float(A[b, k].double().sum())
            for g in G[b, k].double().flatten().tolist():
                denominator = 2 * g * g + total * g ** 3
                alpha = 0.0 if g == 0 or denominator == 0 else g * g / denominator
                weights[b, k] += max(g, 0.0) * alpha
    return _weighted(weights.float(), A)


def xgrad_cam(A, G):
    weights = torch.zeros(A.shape[:2])
    for b in range(A.shape[0]):
        for k in range(A.shape[1]):
            total = A[b, k].sum()
            weights[b, k] = 0.0 if total == 0 else (A[b, k] / total * G[b, k]).sum()
    return _weighted(weights, A)


def hires_cam(A, G):
    return torch.relu(sum(G[:, k:k + 1] * A[:, k:k + 1] for k in range(A.shape[1])))


def layer_cam(A, G):
    return torch.relu(sum(torch.relu(G[:, k:k + 1]) * A[:, k:k + 1] for k in range(A.shape[1])))


def normgrad(A, G):
    return torch.sqrt((A ** 2).sum(dim=1, keepdim=True)) * torch.sqrt((G ** 2).sum(dim=1, keepdim=True))


def eigen_projection(A) -> torch.Tensor:
    """numpy's SVD of each row's centred [positions, channels] matrix; sign: positive correlation
    with the activation's norm over channels (the convention explainers documents)."""
    rows = []
    for activation in A.double().numpy():
        channels, height, width = activation.shape
        samples = activation.reshape(channels, -1).T
        centred = samples - samples.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        projection = centred @ vt[0]
        energy = np.linalg.norm(samples, axis=1)
        if np.dot(projection, energy - energy.mean()) < 0:
            projection = -projection
        rows.append(projection.reshape(1, height, width))
    return torch.from_numpy(np.stack(rows)).float()


def eigen_cam(A, G=None):
    return torch.relu(eigen_projection(A))


GRADIENT_CAMS = {"grad_cam": grad_cam, "grad_cam_plus_plus": grad_cam_plus_plus, "xgrad_cam": xgrad_cam,
                 "hires_cam": hires_cam, "layer_cam": layer_cam, "normgrad": normgrad}
CAMS = {**GRADIENT_CAMS, "eigen_cam": eigen_cam}
