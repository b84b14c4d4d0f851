"""Image file -> model input, exactly as the server does it; training and evaluation share the constants."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

INPUT_SIZE = 64
# Maps [0, 1] pixels to roughly [-2, 2]; the model sees only normalised inputs.
NORMALIZE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
NORMALIZE_STD: tuple[float, float, float] = (0.25, 0.25, 0.25)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> normalised model input."""
    mean = torch.tensor(NORMALIZE_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(NORMALIZE_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def pil_to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """Any PIL image -> float32 [1, 3, 64, 64] in [0, 1] (RGB, bilinear resize)."""
    rgb = image.convert("RGB")
    if rgb.size != (INPUT_SIZE, INPUT_SIZE):
        rgb = rgb.resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR)
    pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).contiguous()


def pil_to_model_input(image: Image.Image) -> torch.Tensor:
    """Any PIL image -> normalised float32 [1, 3, 64, 64]."""
    return normalize(pil_to_unit_tensor(image))


def bytes_to_model_input(data: bytes) -> torch.Tensor:
    """Encoded image bytes (PNG, JPEG, ...) -> normalised float32 [1, 3, 64, 64]."""
    with Image.open(io.BytesIO(data)) as image:
        return pil_to_model_input(image)
