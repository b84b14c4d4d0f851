"""Models by architecture name (torchvision, timm), archives written for them, and the handler's load:
the model built from its settings, its explained path warmed up before the first request."""

from __future__ import annotations

import json
import logging
import zipfile
from types import SimpleNamespace

import pytest
import torch
import torchvision
import yaml

from explainers.errors import UnsupportedModelError
from handlers.image_explainer import ImageExplainerHandler
from handlers.model_loading import load_architecture
from serving.requests import RawRequest
from serving.settings import ServingSettings
from tools.archive import MODEL_CONFIG_NAME, CLASS_NAMES_NAME, architecture_generated_files, unique_class_names

CPU = torch.device("cpu")


def saved_state(tmp_path, model: torch.nn.Module, name="weights.pt"):
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return path


def written(generated: dict[str, bytes]) -> tuple[dict, list[str]]:
    return yaml.safe_load(generated[MODEL_CONFIG_NAME]), json.loads(generated[CLASS_NAMES_NAME])


# --- archives by name: the model's standard preprocessing, offline ---------------------------------


def test_a_torchvision_archive_carries_its_weights_transforms_and_categories(tmp_path):
    config, names = written(architecture_generated_files("torchvision", "resnet18"))
    handler = config["handler"]
    transform = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    assert handler["architecture"] == "torchvision:resnet18"
    assert handler["input_size"] == [224, 224] and handler["resize"] == 256 == transform.resize_size[0]
    assert handler["interpolation"] == "bilinear"
    assert handler["mean"] == list(transform.mean) and handler["std"] == list(transform.std)
    assert names == list(torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"])
    assert handler["class_names"] == CLASS_NAMES_NAME
    (tmp_path / CLASS_NAMES_NAME).write_text(json.dumps(names))
    ServingSettings.from_mapping(handler, tmp_path)  # what the handler will load


def test_a_torchvision_model_keeps_its_own_pipeline_sizes():
    config, _ = written(architecture_generated_files("torchvision", "inception_v3"))
    assert (config["handler"]["input_size"], config["handler"]["resize"]) == ([299, 299], 342)
    config, _ = written(architecture_generated_files("torchvision", "efficientnet_b0"))
    assert config["handler"]["interpolation"] == "bicubic"


def test_a_timm_archive_reads_the_pretrained_config():
    config, names = written(architecture_generated_files("timm", "mobilenetv3_small_050"))
    handler = config["handler"]
    # mobilenetv3_small_050: 224 crop, crop_pct 0.875 -> floor(224 / 0.875) = 256, bicubic.
    assert handler["architecture"] == "timm:mobilenetv3_small_050"
    assert (handler["input_size"], handler["resize"], handler["interpolation"]) == ([224, 224], 256, "bicubic")
    assert len(names) == 1000 and names[0] == "tench" and "crane (134)" in names and "crane (517)" in names
    config, _ = written(architecture_generated_files("timm", "resnet18"))
    assert config["handler"]["resize"] == 235  # crop_pct 0.95: floor(224 / 0.95)


def test_explicit_options_override_the_metadata():
    config, names = written(architecture_generated_files(
        "torchvision", "resnet18", ["cat", "dog"], input_size=[160, 160], resize=200, interpolation="bicubic",
        top_k=2))
    handler = config["handler"]
    assert names == ["cat", "dog"]
    assert (handler["input_size"], handler["resize"], handler["interpolation"], handler["top_k"]) == (
        [160, 160], 200, "bicubic", 2)


def test_unknown_models_and_unloadable_settings_are_refused():
    with pytest.raises(ValueError, match="no classification model"):
        architecture_generated_files("torchvision", "resnet_nonexistent")
    with pytest.raises(ValueError, match="no model"):
        architecture_generated_files("timm", "not_a_timm_model")
    with pytest.raises(ValueError, match="resize"):
        architecture_generated_files("torchvision", "resnet18", resize=100)


def test_repeated_class_names_get_their_index():
    assert unique_class_names(["a", "crane", "b", "crane"]) == ["a", "crane (1)", "b", "crane (3)"]


# --- building architectures ---------------------------------------------------------------------


@pytest.mark.parametrize("architecture, build", [
    ("torchvision:resnet18", lambda: torchvision.models.resnet18(weights=None, num_classes=7)),
    ("timm:mobilenetv3_small_050", lambda: __import__("timm").create_model(
        "mobilenetv3_small_050", pretrained=False, num_classes=7)),
])
def test_an_architecture_by_name_loads_the_archived_weights(tmp_path, architecture, build):
    torch.manual_seed(0)
    original = build().eval()
    loaded = load_architecture(architecture, 7, saved_state(tmp_path, original), CPU)
    inputs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), original(inputs))
    assert not loaded.training


def test_weights_that_do_not_fit_and_unknown_names_are_typed_errors(tmp_path):
    weights = saved_state(tmp_path, torchvision.models.resnet18(weights=None, num_classes=7))
    with pytest.raises(UnsupportedModelError, match="does not fit"):
        load_architecture("torchvision:resnet18", 1000, weights, CPU)
    with pytest.raises(UnsupportedModelError, match="no classification model"):
        load_architecture("torchvision:resnet_nonexistent", 7, weights, CPU)
    with pytest.raises(UnsupportedModelError, match="no model"):
        load_architecture("timm:not_a_timm_model", 7, weights, CPU)


# --- the handler's load: model from settings, warm-up -------------------------------------------


class _Metrics:
    def get_metric(self, name, kind):
        return SimpleNamespace(name=name, kind=kind)


def handler_context(tmp_path, handler_section: dict, manifest_model: dict):
    return SimpleNamespace(
        system_properties={"model_dir": str(tmp_path), "gpu_id": None},
        manifest={"model": manifest_model},
        model_yaml_config={"handler": handler_section},
        metrics=_Metrics(),
        model_name="tiny",
    )


def tiny_resnet_section(**overrides) -> dict:
    return {"architecture": "torchvision:resnet18", "input_size": [32, 32], "resize": 40,
            "class_names": ["a", "b", "c"], "default_explainers": ["guided_backprop", "grad_cam"], **overrides}


def test_the_handler_builds_the_named_architecture_and_warms_its_explained_path(tmp_path, caplog):
    torch.manual_seed(0)
    weights = saved_state(tmp_path, torchvision.models.resnet18(weights=None, num_classes=3))
    handler = ImageExplainerHandler()
    with caplog.at_level(logging.INFO, logger="handlers.image_explainer"):
        handler.initialize(handler_context(tmp_path, tiny_resnet_section(), {"serializedFile": weights.name}))
    assert handler.warm_up.ok and handler.warm_up.explainers == ("guided_backprop", "grad_cam")
    assert handler.warm_up.seconds > 0
    line = next(r.getMessage() for r in caplog.records if "warm-up" in r.getMessage())
    assert "warm-up ok in" in line and " ms" in line and "guided_backprop, grad_cam" in line
    replies = handler.service.handle([RawRequest({"body": _png(48, 40)}, {}, explain_route=True)])
    assert replies[0].status == 200 and set(replies[0].body["explanations"]) == {"guided_backprop", "grad_cam"}


def test_a_failing_warm_up_is_logged_and_predictions_are_still_served(tmp_path, caplog):
    torch.manual_seed(0)
    weights = saved_state(tmp_path, torchvision.models.resnet18(weights=None, num_classes=3))
    # A Grad-CAM layer the model does not have: every explanation with it fails, predictions do not.
    section = tiny_resnet_section(default_explainers=["grad_cam"], explainer_options={"grad_cam": {"layer": "nope"}})
    handler = ImageExplainerHandler()
    with caplog.at_level(logging.INFO, logger="handlers.image_explainer"):
        handler.initialize(handler_context(tmp_path, section, {"serializedFile": weights.name}))
    assert not handler.warm_up.ok and handler.initialized
    failure = next(r for r in caplog.records if "warm-up FAILED" in r.getMessage())
    assert failure.levelno == logging.ERROR and failure.exc_info is not None
    reply = handler.service.handle([RawRequest({"body": _png(48, 40)}, {}, explain_route=False)])[0]
    assert reply.status == 200 and len(reply.body["predictions"]) == 3


def test_an_archive_without_model_file_or_architecture_is_refused(tmp_path):
    weights = saved_state(tmp_path, torchvision.models.resnet18(weights=None, num_classes=3))
    section = {key: value for key, value in tiny_resnet_section().items() if key != "architecture"}
    with pytest.raises(UnsupportedModelError, match="no model file"):
        ImageExplainerHandler().initialize(handler_context(tmp_path, section, {"serializedFile": weights.name}))


def _png(width: int, height: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_archive_cli_packs_a_timm_model_without_model_file(tmp_path, capsys):
    import timm

    from tools.archive import main as archive_main, read_archived_model_config

    weights = saved_state(tmp_path, timm.create_model("mobilenetv3_small_050", pretrained=False))
    arguments = ["--name", "small", "--timm", "mobilenetv3_small_050", "--serialized-file", str(weights),
                 "--export-path", str(tmp_path / "store"), "--top-k", "5",
                 "--no-sanity"]  # packing is the point here; the checks are tested in test_sanity_policy.py
    assert archive_main(arguments) == 0
    mar = tmp_path / "store" / "small.mar"
    with zipfile.ZipFile(mar) as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        names = json.loads(archive.read(CLASS_NAMES_NAME))
    assert "modelFile" not in manifest["model"] and manifest["model"]["serializedFile"] == "weights.pt"
    handler = read_archived_model_config(mar)["handler"]
    assert (handler["architecture"], handler["interpolation"], handler["top_k"]) == (
        "timm:mobilenetv3_small_050", "bicubic", 5)
    assert len(names) == 1000
    assert archive_main([*arguments, "--if-stale"]) == 0 and "up to date" in capsys.readouterr().out
