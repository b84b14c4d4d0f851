"""The demo networks (AllConvNet, served; MaxPoolNet, with max pooling, for the quality report): their
structure, their training, and what the trained models recognise."""

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

from demo import allconv, maxpoolnet, shapes
from demo import train as training
from demo.allconv import AllConvNet
from demo.maxpoolnet import MaxPoolNet
from demo.model_cache import is_cache_fresh, trained_demo_model
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


@pytest.fixture(scope="session")
def maxpool_model() -> MaxPoolNet:
    return trained_demo_model(architecture="maxpool")


@pytest.mark.parametrize(("module", "class_name"), [(allconv, "AllConvNet"), (maxpoolnet, "MaxPoolNet")])
def test_model_file_stands_alone_for_torchserve(module, class_name) -> None:
    tree = ast.parse(Path(module.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"torch", "__future__"}
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    assert classes == [class_name]


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


def test_maxpool_model_downsamples_by_max_pooling_only() -> None:
    model = MaxPoolNet().eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, len(shapes.CLASS_NAMES))
    pools = [module for module in model.modules() if isinstance(module, nn.MaxPool2d)]
    assert len(pools) == 3
    assert all(module.stride == (1, 1) for module in model.modules() if isinstance(module, nn.Conv2d))
    relus = [module for module in model.modules() if isinstance(module, nn.ReLU)]
    assert len(relus) == 5 and len({id(relu) for relu in relus}) == 5 and not any(relu.inplace for relu in relus)
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert training.build("maxpool").__class__ is MaxPoolNet
    with pytest.raises(ValueError, match="unknown demo architecture"):
        training.build("resnet")


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


def test_each_architecture_has_its_own_cached_weights(tmp_path: Path) -> None:
    settings = dataclasses.replace(TINY, architecture="maxpool")
    training.save(training.train(settings), tmp_path)
    assert (tmp_path / "maxpool_state.pt").exists() and (tmp_path / "maxpool_training_summary.json").exists()
    assert is_cache_fresh(tmp_path, "maxpool") and not is_cache_fresh(tmp_path, "allconv")
    assert isinstance(training.load(tmp_path, "maxpool"), MaxPoolNet)


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


def test_maxpool_model_held_out_accuracy(maxpool_model: MaxPoolNet) -> None:
    # Trained by the same machinery (data, schedule, steps) as the served AllConvNet.
    accuracy = training.evaluate(maxpool_model, count=1000, seed=HELD_OUT_SEED)
    assert accuracy >= 0.95
    assert maxpool_model(torch.zeros(1, 3, 64, 64)).shape == (1, len(shapes.CLASS_NAMES))


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
