"""The demo AllConvNet: its structure, its training, and what the trained model recognises."""

from __future__ import annotations

import ast
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from demo import allconv, shapes
from demo import train as training
from demo.allconv import AllConvNet
from demo.model_cache import trained_demo_model
from demo.preprocessing import bytes_to_model_input, normalize

HELD_OUT_SEED = 20_240_601  # never used by training (seed 0) nor its own held-out set


@pytest.fixture(scope="session")
def model() -> AllConvNet:
    # Trains into model_store/build/ (about a minute) unless a model newer than the demo code is there.
    return trained_demo_model()


def predict(model: nn.Module, model_input: torch.Tensor) -> str:
    with torch.no_grad():
        return shapes.CLASS_NAMES[int(model(model_input).argmax(dim=1))]


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8))


# --- structure --------------------------------------------------------------------------------


def test_model_file_stands_alone_for_torchserve() -> None:
    tree = ast.parse(Path(allconv.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"torch", "__future__"}
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    assert classes == ["AllConvNet"]


def test_default_model_matches_the_class_list_and_is_all_convolutional() -> None:
    model = AllConvNet().eval()
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, len(shapes.CLASS_NAMES))
    kinds = {type(module) for module in model.modules()}
    assert not kinds & {nn.MaxPool2d, nn.AvgPool2d, nn.Linear}
    relus = [module for module in model.modules() if isinstance(module, nn.ReLU)]
    assert len(relus) >= 5 and not any(relu.inplace for relu in relus)
    # Every ReLU is a distinct module, so per-module hooks see each layer separately.
    assert len({id(relu) for relu in relus}) == len(relus)
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert len(strided) == 3


def test_model_is_small_and_takes_other_input_sizes() -> None:
    model = AllConvNet().eval()
    assert sum(p.numel() for p in model.parameters()) < 200_000
    # Global average pooling makes the classifier size-agnostic.
    assert model(torch.randn(1, 3, 96, 80)).shape == (1, len(shapes.CLASS_NAMES))


# --- training ---------------------------------------------------------------------------------

TINY = training.TrainingSettings(epochs=1, steps_per_epoch=3, batch_size=8, held_out_size=20)


def test_training_is_deterministic_for_a_seed_and_restores_torch_state() -> None:
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    first = training.train(TINY).model.state_dict()
    second = training.train(TINY).model.state_dict()
    other = training.train(dataclasses.replace(TINY, seed=1)).model.state_dict()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
    assert not torch.equal(first["classifier.weight"], other["classifier.weight"])
    assert torch.get_num_threads() == threads_before
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before


def test_cli_writes_state_label_map_and_summary(tmp_path: Path) -> None:
    tiny = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8", "--held-out-size", "10"]
    training.main(["--out", str(tmp_path), *tiny])
    index_to_name = json.loads((tmp_path / training.INDEX_TO_NAME_FILE).read_text())
    assert index_to_name == {str(i): name for i, name in enumerate(shapes.CLASS_NAMES)}
    summary = json.loads((tmp_path / training.SUMMARY_FILE).read_text())
    assert 0.0 <= summary["held_out_accuracy"] <= 1.0 and summary["settings"]["steps_per_epoch"] == 2
    loaded = training.load(tmp_path)
    assert not loaded.training
    state = torch.load(tmp_path / training.STATE_FILE, weights_only=True)
    torch.testing.assert_close(loaded.state_dict()["classifier.weight"], state["classifier.weight"])


def test_random_blur_smooths_only_the_chosen_images() -> None:
    images = torch.zeros(16, 3, 64, 64)
    images[..., 32:] = 1.0  # a vertical step edge
    settings = training.TrainingSettings(blur_fraction=0.5)
    blurred = training.random_blur(images, settings, torch.Generator().manual_seed(0))
    changed = (blurred != images).flatten(1).any(dim=1)
    assert 0 < int(changed.sum()) < 16
    assert torch.equal(blurred[~changed], images[~changed])
    edge = blurred[changed][:, :, :, 31:33]
    assert ((edge > 0.0) & (edge < 1.0)).all()  # the step is softened on both sides
    # Each kernel sums to one and the padding replicates the border, so flat regions stay flat.
    torch.testing.assert_close(blurred[changed][..., :24], torch.zeros_like(blurred[changed][..., :24]))
    torch.testing.assert_close(blurred[changed][..., 40:], torch.ones_like(blurred[changed][..., 40:]))


# --- the trained model ------------------------------------------------------------------------


def test_held_out_accuracy(model: AllConvNet) -> None:
    accuracy = training.evaluate(model, count=1000, seed=HELD_OUT_SEED)
    assert accuracy >= 0.95


@pytest.mark.parametrize(
    ("name", "foreground", "background"),
    [
        ("circle", (0.9, 0.1, 0.1), (0.1, 0.1, 0.15)),  # the red circle on a dark background
        ("square", (0.9, 0.1, 0.1), (0.1, 0.1, 0.15)),
        ("triangle", (0.9, 0.1, 0.1), (0.1, 0.1, 0.15)),
        ("cross", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
        ("star", (0.1, 0.2, 0.8), (0.95, 0.95, 0.85)),
    ],
)
def test_clean_centred_drawing_is_recognised(model: AllConvNet, name: str, foreground, background) -> None:
    image, _ = shapes.draw_shape(name, foreground=foreground, background=background)
    assert predict(model, normalize(torch.from_numpy(image)[None])) == name


@pytest.mark.parametrize("name", shapes.CLASS_NAMES)
def test_noisy_300px_jpeg_is_recognised_after_server_preprocessing(model: AllConvNet, name: str) -> None:
    image, _ = shapes.draw_shape(
        name, size=300, foreground=(0.95, 0.8, 0.2), background=(0.2, 0.3, 0.5), rotation=0.3, noise_std=0.1
    )
    encoded = io.BytesIO()
    to_pil(image).save(encoded, format="JPEG", quality=75)
    assert predict(model, bytes_to_model_input(encoded.getvalue())) == name


def test_prediction_follows_the_shape_not_the_colours(model: AllConvNet) -> None:
    # Same colours and size for every class: a model keyed on colour would give one answer.
    predictions = [
        predict(model, normalize(torch.from_numpy(shapes.draw_shape(name, diameter=28)[0])[None]))
        for name in shapes.CLASS_NAMES
    ]
    assert predictions == list(shapes.CLASS_NAMES)
