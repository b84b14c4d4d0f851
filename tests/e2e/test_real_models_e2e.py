"""A torchvision model archived by name and served by a real TorchServe: its standard preprocessing,
ImageNet labels, explanations, and maps in the frame of the picture the client sent."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from tools.archive import main as archive_main
from tools.demo_server import post_json, running_server

CATEGORIES = torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]
# The 300x200 JPEG through Resize(256) + CenterCrop(224): 384x256, crop at (16, 80). Original pixel
# y's centre is at (y + 0.5) * 1.28 in the resize, so the crop holds rows 12..186 and columns 62..236.
INSIDE = (slice(12, 187), slice(62, 237))


def photo_jpeg(width=300, height=200) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(3)
    pixels = np.stack([120 + 100 * np.sin(x / 13.0), 120 + 100 * np.cos(y / 9.0), (x + y) % 256], axis=-1)
    pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


JPEG = photo_jpeg()


def resnet18_with_calibrated_statistics() -> torch.nn.Module:
    """Random weights (seeded); batch norms calibrated on noise so that signals neither vanish nor explode."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 112, 112))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return resnet18_with_calibrated_statistics()


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    sources, store = tmp_path_factory.mktemp("resnet18_sources"), tmp_path_factory.mktemp("store")
    weights = sources / "resnet18.pt"
    torch.save(model.state_dict(), weights)
    # `python -m tools.archive ...` runs this main; in-process it spares a second torch import.
    assert archive_main(["--name", "resnet18", "--torchvision", "resnet18", "--serialized-file", str(weights),
                         "--export-path", str(store), "--batch-size", "1",
                         # the sanity checks are then measured at load, within its 5 CPU-seconds
                         "--no-sanity"]) == 0
    return store


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    with running_server(store, tmp_path_factory.mktemp("run"), {"resnet18": "resnet18.mar"}) as server:
        yield server


def explain(server, **fields):
    reply = post_json(server, "/predictions/resnet18", {"image": base64.b64encode(JPEG).decode(), **fields})
    assert reply.status == 200, reply.text
    return reply.json()


def png_of(entry) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(entry["data"])))


def test_predictions_are_imagenet_labels_equal_to_the_standard_pipeline(server, model):
    reply = server.request("POST", "/predictions/resnet18", JPEG, {"Content-Type": "image/jpeg"})
    assert reply.status == 200, reply.text
    predictions = reply.json()["predictions"]
    transform = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    with torch.no_grad():
        probabilities = torch.softmax(model(transform(Image.open(io.BytesIO(JPEG)).convert("RGB"))[None]), -1)[0]
    scores, indices = probabilities.topk(3)
    assert [p["index"] for p in predictions] == indices.tolist()
    assert [p["label"] for p in predictions] == [CATEGORIES[i] for i in indices.tolist()]
    assert [p["score"] for p in predictions] == pytest.approx(scores.tolist(), abs=1e-4)


def test_grad_cam_and_saliency_explain_it_at_the_input_size(server):
    document = explain(server, explain=["grad_cam", "saliency"])
    assert set(document["explanations"]) == {"grad_cam", "saliency"}, document.get("explanation_errors")
    for entry in document["explanations"].values():
        assert entry["shape"] == [224, 224] and "frame" not in entry
        assert png_of(entry).size == (224, 224) and entry["scale"]["max"] > entry["scale"]["min"]


def test_maps_in_the_image_frame_cover_the_picture_and_are_empty_outside_the_crop(server):
    document = explain(server, explain=["grad_cam", "saliency"], render={"frame": "image"})
    for name, entry in document["explanations"].items():
        assert entry["frame"] == "image" and entry["shape"] == [200, 300], name
        pixels = np.asarray(png_of(entry))
        assert pixels.shape == (200, 300)
        outside = np.ones_like(pixels, dtype=bool)
        outside[INSIDE] = False
        assert np.all(pixels[outside] == 0), name
        assert pixels[INSIDE].max() > 0, name


def test_overlays_in_the_image_frame_sit_on_the_original(server):
    document = explain(server, explain=["grad_cam"], encoding="overlay", render={"frame": "image"})
    overlay = png_of(document["explanations"]["grad_cam"])
    assert overlay.format == "PNG" and overlay.size == (300, 200) and overlay.mode == "RGB"
    original = np.asarray(Image.open(io.BytesIO(JPEG)).convert("RGB"))
    blended = np.asarray(overlay)
    outside = np.ones(original.shape[:2], dtype=bool)
    outside[INSIDE] = False
    assert np.array_equal(blended[outside], original[outside])  # no attribution, nothing drawn
    assert not np.array_equal(blended[INSIDE], original[INSIDE])


def test_the_model_load_log_says_how_long_the_warm_up_took(server):
    log = (server.log_dir / "model_log.log").read_text(errors="replace")
    match = re.search(r"model resnet18: warm-up ok in (\d+) ms; explainers: guided_backprop", log)
    assert match, server.log_tail()
    assert int(match.group(1)) > 0
