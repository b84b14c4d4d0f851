"""Maps in the client's image frame ("frame": "image"): every encoding, the area outside the crop
empty, the size cap on large originals, and requests through the service."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from explainers.errors import InvalidOptionError
from serving.frames import FrameGeometry, ImageFrame
from serving.images import Preprocessor
from serving.rendering.encode import encode_attribution
from serving.rendering.options import RenderOptions
from serving.requests import RawRequest
from serving.service import ExplanationService
from serving.settings import ServingSettings
from support.models import ModuleReluNet, seeded

# 300x200 (W x H) original, shorter side to 40 -> 60x40, centre 32x32 crop at (4, 14).
GEOMETRY = Preprocessor(size=(32, 32), mean=[0.5] * 3, std=[0.25] * 3, resize=40).geometry((200, 300))
FRAME = ImageFrame(GEOMETRY, (200, 300))
# Original rows whose centre lands inside the crop: (y + 0.5) * 40/200 in [4, 36) -> 20..179;
# columns (x + 0.5) * 60/300 in [14, 46) -> 70..229.
INSIDE = (slice(20, 180), slice(70, 230))


def outside(values: np.ndarray) -> np.ndarray:
    mask = np.ones(values.shape[-2:], dtype=bool)
    mask[INSIDE] = False
    return values[..., mask]


def attribution(seed=0) -> torch.Tensor:
    return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed)) + 0.5


def decoded(entry) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(entry["data"])))


def encode(encoding, image=None, **options):
    return encode_attribution(attribution(), options=RenderOptions(encoding=encoding, frame="image", **options),
                              image=image, image_frame=FRAME)


def test_the_geometry_of_the_fixture():
    assert GEOMETRY == FrameGeometry((200, 300), (40, 60), (4, 14, 32, 32))


@pytest.mark.parametrize("polarity, empty_index", [("positive", 0), ("both", 128)])
def test_png_in_the_image_frame_is_empty_outside_the_crop(polarity, empty_index):
    entry = encode("png", polarity=polarity)
    input_entry = encode_attribution(attribution(), options=RenderOptions(encoding="png", polarity=polarity))
    assert entry["frame"] == "image" and entry["shape"] == [200, 300]
    assert entry["scale"] == input_entry["scale"]  # the display range is the input-frame map's
    pixels = np.asarray(decoded(entry))
    assert pixels.shape == (200, 300)
    assert np.all(outside(pixels) == empty_index)
    assert len(np.unique(pixels[INSIDE])) > 50


def test_an_overlay_sits_on_the_original_image_unchanged_outside_the_crop():
    original = torch.rand(3, 200, 300, generator=torch.Generator().manual_seed(1))
    entry = encode("overlay", image=original)
    pixels = np.asarray(decoded(entry)).astype(int)
    assert entry["shape"] == [200, 300] and pixels.shape == (200, 300, 3)
    expected = np.rint(original.permute(1, 2, 0).numpy() * 255).astype(int)
    assert np.array_equal(outside(np.moveaxis(pixels, -1, 0)), outside(np.moveaxis(expected, -1, 0)))
    assert np.abs(pixels[INSIDE] - expected[INSIDE]).max() > 20


def test_npy_f16_carries_each_channel_and_json_is_limited_to_small_frames():
    entry = encode("npy-f16")
    values = np.load(io.BytesIO(base64.b64decode(entry["data"])))
    assert entry["shape"] == [3, 200, 300] and values.shape == (3, 200, 300)
    assert np.all(outside(values) == 0)
    # Flat inside when the map is flat: bilinear resampling reproduces a constant.
    flat = encode_attribution(torch.ones(3, 32, 32), options=RenderOptions(encoding="npy-f16", frame="image"),
                              image_frame=FRAME)
    flat_values = np.load(io.BytesIO(base64.b64decode(flat["data"])))
    assert np.all(flat_values[(slice(None), *INSIDE)] == 1)
    with pytest.raises(InvalidOptionError, match="image frame"):
        encode("json")
    small = ImageFrame(GEOMETRY, GEOMETRY.image_frame_size(3000))
    entry = encode_attribution(attribution(), options=RenderOptions(encoding="json", frame="image"), image_frame=small)
    assert entry["shape"] == list(small.size) and len(entry["data"]) == small.size[0]


def test_frame_input_is_unchanged_by_a_frame_given():
    options = RenderOptions(encoding="png")
    assert encode_attribution(attribution(), options=options, image_frame=FRAME) == encode_attribution(
        attribution(), options=options)


def test_an_8000x6000_original_stays_within_the_frame_cap_at_a_bounded_cost():
    geometry = Preprocessor(size=(224, 224), mean=[0.5] * 3, std=[0.25] * 3, resize=256).geometry((6000, 8000))
    frame = ImageFrame(geometry, geometry.image_frame_size(1_048_576))
    base = torch.rand(3, *frame.size, generator=torch.Generator().manual_seed(2))  # noise: the worst PNG case
    started = time.perf_counter()
    entries = {encoding: encode_attribution(torch.randn(3, 224, 224), options=RenderOptions(encoding=encoding, frame="image"),
                                            image=base, image_frame=frame)
               for encoding in ("png", "overlay", "npy-f16")}
    seconds = time.perf_counter() - started
    assert entries["overlay"]["shape"] == list(frame.size) and frame.size[0] * frame.size[1] <= 1_048_576
    payload = sum(len(entry["data"]) for entry in entries.values())
    # 1 MP: the noise overlay is the largest (about 4 MB of base64), the whole lot about 12 MB
    assert payload < 16_000_000, payload
    assert seconds < 8, seconds


# --- through the service ------------------------------------------------------------------------


CLASSES = ["circle", "square", "triangle", "cross"]


def jpeg(width=300, height=200) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def service():
    settings = ServingSettings.from_mapping({
        "input_size": [32, 32], "resize": 40, "class_names": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3,
        "default_explainers": ["saliency", "grad_cam"], "top_k": 2, "caps": {"max_frame_pixels": 20_000}})
    return ExplanationService(seeded(ModuleReluNet(classes=4)), settings)


def explain(service, **fields):
    request = RawRequest({"body": {"image": base64.b64encode(jpeg()).decode(), "explain": ["saliency", "grad_cam"],
                                   **fields}}, {}, False)
    return service.handle([request])[0]


def test_a_request_in_the_image_frame_gets_maps_over_its_picture(service):
    reply = explain(service, render={"frame": "image"}, encoding="overlay")
    assert reply.status == 200, reply.body
    # 300x200 = 60000 pixels is over this model's max_frame_pixels of 20000: the same aspect ratio within it.
    for entry in reply.body["explanations"].values():
        assert entry["frame"] == "image" and entry["shape"] == [115, 173]
        assert decoded(entry).size == (173, 115)
    plain = explain(service)
    assert all("frame" not in entry and entry["shape"] == [32, 32] for entry in plain.body["explanations"].values())
    assert plain.body["predictions"] == reply.body["predictions"]


def test_json_in_the_image_frame_is_refused_before_any_work(service):
    reply = explain(service, render={"frame": "image"}, encoding="json")
    assert reply.status == 400 and reply.body["error"]["code"] == "invalid_option"
    assert "image frame" in reply.body["error"]["message"]


def test_an_unknown_frame_is_a_typed_error(service):
    reply = explain(service, render={"frame": "original"})
    assert reply.status == 400 and "frame" in reply.body["error"]["message"]
