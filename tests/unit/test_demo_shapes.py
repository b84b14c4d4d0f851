"""The synthetic shapes data and the server-style preprocessing."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from demo import shapes
from demo.preprocessing import (
    NORMALIZE_MEAN,
    NORMALIZE_STD,
    bytes_to_model_input,
    normalize,
    pil_to_model_input,
)

SEED = 7
COUNT = 500


@pytest.fixture(scope="module")
def batch() -> shapes.ShapesBatch:
    return shapes.generate(COUNT, SEED)


def test_batch_layout_and_ranges(batch: shapes.ShapesBatch) -> None:
    assert batch.images.shape == (COUNT, 3, 64, 64) and batch.images.dtype == np.float32
    assert batch.masks.shape == (COUNT, 64, 64) and batch.masks.dtype == bool
    assert batch.labels.shape == (COUNT,) and batch.labels.dtype == np.int64
    assert batch.images.min() >= 0.0 and batch.images.max() <= 1.0
    assert set(batch.labels.tolist()) == set(range(len(shapes.CLASS_NAMES)))


def test_class_names_are_fixed() -> None:
    assert shapes.CLASS_NAMES[:3] == ("circle", "square", "triangle")
    assert len(shapes.CLASS_NAMES) == len(set(shapes.CLASS_NAMES)) == 5


def test_every_mask_holds_a_whole_shape_of_plausible_size(batch: shapes.ShapesBatch) -> None:
    areas = batch.masks.sum(axis=(1, 2))
    # The smallest shape (a 12-px star) covers about 1.3 * 6^2 px; the largest (48-px circle) pi * 24^2.
    assert areas.min() >= 30
    assert areas.max() <= math.pi * 24**2 * 1.05


def test_mask_pixels_carry_the_foreground_colour(batch: shapes.ShapesBatch) -> None:
    # Noise is zero-mean and the median survives clipping at 0 and 1, so the median of each
    # channel over the mask sits on the drawn colour.
    for image, mask, foreground in zip(batch.images, batch.masks, batch.foregrounds):
        medians = np.median(image[:, mask], axis=1)
        np.testing.assert_allclose(medians, foreground, atol=0.05)


def test_background_pixels_carry_the_background_colour(batch: shapes.ShapesBatch) -> None:
    for image, mask, background in zip(batch.images, batch.masks, batch.backgrounds):
        medians = np.median(image[:, ~mask], axis=1)
        # The ramp moves the background by up to half its amplitude.
        np.testing.assert_allclose(medians, background, atol=shapes.MAX_GRADIENT_AMPLITUDE / 2 + 0.03)


def test_foreground_and_background_contrast(batch: shapes.ShapesBatch) -> None:
    distances = np.linalg.norm(batch.foregrounds - batch.backgrounds, axis=1)
    assert distances.min() >= shapes.MIN_COLOUR_DISTANCE


def test_images_vary_in_noise_size_and_position(batch: shapes.ShapesBatch) -> None:
    noise_free = [np.ptp(image[:, mask], axis=1).max() == 0 for image, mask in zip(batch.images, batch.masks)]
    assert 0.1 < np.mean(noise_free) < 0.4  # a quarter are drawn without noise
    areas = batch.masks.sum(axis=(1, 2))
    assert areas.max() > 8 * areas.min()
    rows = np.array([np.argwhere(mask).mean(axis=0) for mask in batch.masks])
    assert rows.min() < 20 and rows.max() > 44


def test_same_seed_same_batch_other_seed_other_batch(batch: shapes.ShapesBatch) -> None:
    again = shapes.generate(COUNT, SEED)
    other = shapes.generate(COUNT, SEED + 1)
    np.testing.assert_array_equal(again.images, batch.images)
    np.testing.assert_array_equal(again.masks, batch.masks)
    np.testing.assert_array_equal(again.labels, batch.labels)
    assert not np.array_equal(other.labels, batch.labels)
    assert not np.array_equal(other.masks, batch.masks)


def test_torch_batch_matches_numpy_batch(batch: shapes.ShapesBatch) -> None:
    tensors = shapes.generate_torch(COUNT, SEED)
    assert tensors.images.dtype == torch.float32 and tensors.labels.dtype == torch.int64
    np.testing.assert_array_equal(tensors.images.numpy(), batch.images)
    np.testing.assert_array_equal(tensors.labels.numpy(), batch.labels)
    np.testing.assert_array_equal(tensors.masks.numpy(), batch.masks)


def test_other_image_sizes_scale_the_shapes() -> None:
    small = shapes.generate(50, 3, size=64)
    large = shapes.generate(50, 3, size=128)
    np.testing.assert_array_equal(small.labels, large.labels)
    ratio = large.masks.sum(axis=(1, 2)) / small.masks.sum(axis=(1, 2))
    np.testing.assert_allclose(ratio, 4.0, rtol=0.25)


# Areas in units of the squared circumradius R^2, from each shape's own geometry.
CROSS_WIDTH = shapes.CROSS_ARM_WIDTH_RATIO
CROSS_HALF_LENGTH_SQUARED = 1 / (1 + CROSS_WIDTH**2)
EXPECTED_AREA_OVER_R2 = {
    "circle": math.pi,
    "square": 2.0,
    "triangle": 3 * math.sqrt(3) / 4,
    # two 2L x 2w arms minus their 2w x 2w overlap, with w = 0.3 L
    "cross": (8 * CROSS_WIDTH - 4 * CROSS_WIDTH**2) * CROSS_HALF_LENGTH_SQUARED,
    # ten triangles (centre, tip, inner vertex)
    "star": 5 * shapes.STAR_INNER_RATIO * math.sin(math.pi / 5),
}


@pytest.mark.parametrize("name", shapes.CLASS_NAMES)
def test_drawn_shape_has_its_geometric_area_and_is_centred(name: str) -> None:
    size, diameter = 256, 40.0
    radius = diameter / 2 * size / 64
    _, mask = shapes.draw_shape(name, size=size, diameter=diameter, rotation=0.4)
    assert mask.sum() == pytest.approx(EXPECTED_AREA_OVER_R2[name] * radius**2, rel=0.02)
    # Every one of these regular shapes has its centroid at its circumcentre.
    centroid = np.argwhere(mask).mean(axis=0) + 0.5
    np.testing.assert_allclose(centroid, [size / 2, size / 2], atol=0.5)


def test_clean_drawing_is_exactly_two_colours() -> None:
    foreground, background = (0.9, 0.1, 0.1), (0.1, 0.1, 0.15)
    image, mask = shapes.draw_shape("circle", foreground=foreground, background=background)
    for region, colour in ((mask, foreground), (~mask, background)):
        pixels = image[:, region]
        np.testing.assert_array_equal(pixels, np.broadcast_to(np.float32(colour)[:, None], pixels.shape))


def test_unrotated_triangle_points_up_and_square_is_axis_aligned() -> None:
    _, triangle = shapes.draw_shape("triangle", size=128)
    rows = np.flatnonzero(triangle.any(axis=1))
    assert triangle[rows[0]].sum() < 5 < triangle[rows[-1]].sum()  # apex on top, base below
    _, square = shapes.draw_shape("square", size=128)
    widths = square.sum(axis=1)
    assert len(set(widths[widths > 0].tolist())) == 1  # every row of an upright square is equally wide
    _, diamond = shapes.draw_shape("square", size=128, rotation=math.pi / 4)
    assert len(set(diamond.sum(axis=1).tolist())) > 10


def test_unknown_class_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="hexagon"):
        shapes.draw_shape("hexagon")


def test_normalisation_constants() -> None:
    images = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    normalised = normalize(images)
    assert NORMALIZE_MEAN == (0.5, 0.5, 0.5) and NORMALIZE_STD == (0.25, 0.25, 0.25)
    torch.testing.assert_close(normalised[0, :, 0], torch.tensor([-2.0, 0.0, 2.0]).expand(3, 3))


def test_pil_input_is_resized_bilinearly_converted_to_rgb_and_normalised() -> None:
    # A left-to-right grey ramp: bilinear resizing keeps it a ramp, colour conversion copies it
    # into three equal channels.
    ramp = np.tile(np.linspace(0, 255, 200).round().astype(np.uint8), (100, 1))
    image = Image.fromarray(ramp, mode="L")
    model_input = pil_to_model_input(image)
    assert model_input.shape == (1, 3, 64, 64) and model_input.dtype == torch.float32
    expected = np.asarray(image.convert("RGB").resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255
    torch.testing.assert_close(model_input[0], (torch.from_numpy(expected).permute(2, 0, 1) - 0.5) / 0.25)
    assert torch.equal(model_input[0, 0], model_input[0, 2])
    assert (model_input[0, 0].diff(dim=1) > 0).all()


def test_bytes_and_pil_paths_agree() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (90, 70, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="RGBA")
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    torch.testing.assert_close(bytes_to_model_input(encoded.getvalue()), pil_to_model_input(image))
