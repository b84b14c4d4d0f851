"""Preprocessing as the model's standard pipeline (shorter side, centre crop) and the way back:
the geometry each request records and maps carried from the model's input to the client's image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from explainers.errors import InvalidOptionError
from serving.frames import FrameGeometry
from serving.images import Preprocessor
from serving.settings import ServingSettings

INTERPOLATION_MODES = {
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "nearest": transforms.InterpolationMode.NEAREST,
}


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth structure plus noise: both the filters' low-pass and their edge taps matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([np.sin(x / 7.0 + c) * np.cos(y / 11.0 - c) for c in range(3)], axis=-1) * 90 + 128
    pixels = np.clip(smooth + rng.normal(0, 30, smooth.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def preprocessor(resize=None, size=(224, 224), interpolation="bilinear") -> Preprocessor:
    return Preprocessor(size=size, mean=[0.5] * 3, std=[0.25] * 3, resize=resize, interpolation=interpolation)


# --- the geometry, by hand -------------------------------------------------------------------


def test_landscape_geometry_is_the_shorter_side_then_the_centre_crop():
    # 768x512 (W x H) -> shorter side 256: 384x256; centre 224 crop starts at (256-224)/2, (384-224)/2.
    geometry = preprocessor(resize=256).geometry((512, 768))
    assert geometry == FrameGeometry((512, 768), (256, 384), (16, 80, 224, 224))


def test_portrait_geometry_truncates_the_longer_side_and_rounds_the_offset_half_to_even():
    # 300x451 (W x H): the longer side int(256 * 451 / 300) = 384 (384.85 truncated).
    assert preprocessor(resize=256).geometry((451, 300)).resized_size == (384, 256)
    # Offsets (385-224)/2 = 80.5 -> 80 and (387-224)/2 = 81.5 -> 82: Python's round, as CenterCrop.
    assert preprocessor(resize=256).geometry((256, 385)).crop_box == (16, 80, 224, 224)
    assert preprocessor(resize=256).geometry((256, 387)).crop_box == (16, 82, 224, 224)


def test_without_resize_the_whole_image_is_the_input():
    geometry = preprocessor(size=(64, 48)).geometry((200, 300))
    assert geometry == FrameGeometry((200, 300), (64, 48), (0, 0, 64, 48))


# --- equal to torchvision's Resize + CenterCrop ------------------------------------------------


@pytest.mark.parametrize("interpolation", list(INTERPOLATION_MODES))
@pytest.mark.parametrize("width, height", [(300, 200), (200, 300), (640, 427), (257, 1001), (224, 224), (180, 150)])
def test_resize_and_crop_equal_torchvision_on_pil_images(width, height, interpolation):
    image = photo(width, height)
    reference = transforms.Compose([
        transforms.Resize(256, interpolation=INTERPOLATION_MODES[interpolation]),
        transforms.CenterCrop(224),
    ])(image)
    expected = torch.from_numpy(np.asarray(reference).copy()).permute(2, 0, 1).int()
    ours = preprocessor(resize=256, interpolation=interpolation).pixels(image).int()
    assert ours.shape == expected.shape == (3, 224, 224)
    assert torch.equal(ours, expected)


def test_direct_resize_keeps_its_behaviour():
    image = photo(90, 70)
    expected = np.asarray(image.resize((48, 64), resample=Image.Resampling.BICUBIC))
    ours = preprocessor(size=(64, 48), interpolation="bicubic").pixels(image).permute(1, 2, 0).numpy()
    assert np.array_equal(ours, expected)


def test_preprocessor_refuses_a_crop_larger_than_the_resize_and_unknown_filters():
    with pytest.raises(InvalidOptionError, match="resize"):
        preprocessor(resize=200)
    with pytest.raises(InvalidOptionError, match="interpolation"):
        preprocessor(resize=256, interpolation="lanczos")


# --- maps back in the image frame ---------------------------------------------------------------


def landscape() -> FrameGeometry:
    """768x512 original, exact scale 2 to the 384x256 resize, crop (16, 80, 224, 224)."""
    return FrameGeometry((512, 768), (256, 384), (16, 80, 224, 224))


def test_a_flat_map_covers_exactly_the_crop_in_the_image_frame():
    carried = landscape().to_image_frame(torch.ones(224, 224), (512, 768))
    # Original pixel y has its centre at (y + 0.5) / 2 in the resize: inside the crop from
    # y = 32 (16.25) to y = 479 (239.75); columns 160 (80.25) to 607 (303.75).
    expected = torch.zeros(512, 768)
    expected[32:480, 160:608] = 1
    assert torch.equal(carried, expected)


def test_one_input_pixel_lands_on_its_original_pixels():
    impulse = torch.zeros(224, 224)
    impulse[10, 20] = 1.0
    carried = landscape().to_image_frame(impulse, (512, 768))
    # Input pixel (10, 20) is resized pixel (26, 100), i.e. original pixels 52-53 x 200-201. Their
    # centres sit a quarter pixel from (10, 20) in the input: bilinear weight 0.75 per axis.
    assert torch.allclose(carried[52:54, 200:202], torch.full((2, 2), 0.5625, dtype=carried.dtype))
    rest = carried.clone()
    rest[52:54, 200:202] = 0
    assert float(rest.max()) < 0.5625
    assert float(carried.sum()) == pytest.approx(4.0)  # a 2x upscale spreads one pixel over 2x2


def test_channels_and_coarse_cells_are_carried_too():
    grid = torch.arange(4, dtype=torch.float64).view(1, 2, 2).repeat(3, 1, 1)  # 2x2 cells over the crop
    carried = landscape().to_image_frame(grid, (512, 768), cells=True)
    assert carried.shape == (3, 512, 768)
    # The crop's left half (input columns 0..111) is original columns 160..383, top half rows 32..255.
    assert torch.all(carried[:, 32:256, 160:384] == 0) and torch.all(carried[:, 32:256, 384:608] == 1)
    assert torch.all(carried[:, 256:480, 160:384] == 2) and torch.all(carried[:, 256:480, 384:608] == 3)
    assert torch.all(carried[:, :32] == 0) and torch.all(carried[:, :, 608:] == 0)


def test_a_large_original_gets_its_map_within_the_frame_pixel_cap():
    geometry = preprocessor(resize=256).geometry((6000, 8000))
    height, width = geometry.image_frame_size(1_048_576)
    assert height * width <= 1_048_576 and abs(width / height - 8000 / 6000) < 0.01
    assert geometry.image_frame_size(50_000_000) == (6000, 8000)


# --- handler settings -----------------------------------------------------------------------


def settings(**section) -> ServingSettings:
    return ServingSettings.from_mapping({"input_size": 224, "class_names": ["a", "b", "c"], **section})


def test_preprocessing_settings_are_validated_at_load():
    good = settings(resize=256, interpolation="bicubic", architecture="timm:convnext_tiny")
    assert (good.resize, good.interpolation, good.architecture) == (256, "bicubic", "timm:convnext_tiny")
    assert settings().resize is None and settings().interpolation == "bilinear"
    for bad in ({"resize": 200}, {"resize": 0}, {"resize": True}, {"resize": "256"}, {"interpolation": "area"},
                {"architecture": "resnet50"}, {"architecture": "keras:resnet50"}, {"architecture": "torchvision:"}):
        with pytest.raises(InvalidOptionError):
            settings(**bad)
