"""``python -m tools.quality_report``: tiny real runs (the demo, a torchvision model by name, a model
archive with sample images), their JSON layout, table and picture."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import explainers
from tools import quality_figure as figure, quality_report as report, quality_sources
from tools.quality_sources import ModelSource

HEADLINE = ("deletion_auc", "insertion_auc", "pointing_game", "mask_energy", "class_map_similarity",
            "randomization_similarity")
UNIT_INTERVAL = ("deletion_auc", "insertion_auc", "pointing_game", "mask_energy")
DEMO_CASCADE = ["classifier", "features.15", "features.12", "features.9", "features.6", "features.3", "features.0"]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    report.main(["--out", str(out), "--demo", "allconv", "--images", "6", "--cascade-images", "3", "--steps", "4",
                 "--examples", "2"])
    return out


def test_json_layout(tiny_report):
    document = json.loads((tiny_report / "quality.json").read_text())  # strict JSON: no NaN
    assert isinstance(document["model"], str) and "AllConvNet" in document["model"]
    assert document["images"] == 6
    assert set(document["methods"]) == set(explainers.available()) and "unavailable" not in document
    for name, entry in document["methods"].items():
        for metric in HEADLINE:
            assert isinstance(entry[metric], float), (name, metric, entry[metric])
        for metric in UNIT_INTERVAL:
            assert 0 <= entry[metric] <= 1, (name, metric)
        assert -1 <= entry["class_map_similarity"] <= 1 and -1 <= entry["randomization_similarity"] <= 1
        assert entry["images"] <= 6
        cascade = entry["randomization"]["cascade"]
        assert [step["layer"] for step in cascade] == DEMO_CASCADE
        defined = [step["similarity"] for step in cascade if step["similarity"] is not None]
        assert entry["randomization_similarity"] == pytest.approx(sum(defined) / len(defined), abs=1e-3)
        assert len(entry["deletion_curve"]) == 5  # steps + 1
    assert set(document["references"]) == {"random", "edge_detector"}
    # The edge detector never reads the model: its maps are the same whatever the class.
    assert document["references"]["edge_detector"]["class_map_similarity"] == pytest.approx(1.0)


def test_markdown_table_shows_the_json_numbers(tiny_report):
    document = json.loads((tiny_report / "quality.json").read_text())
    table = (tiny_report / "quality.md").read_text()
    for name, entry in document["methods"].items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` | {entry['images']} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[2:8] == [f"{entry[metric]:.3f}" for metric in HEADLINE], name
    assert "![" in table and "quality.png" in table


class GatedNet(nn.Module):
    """A squeeze-excitation style gate: lrp has no rule for a product of two input-dependent tensors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        features = torch.relu(self.conv(x))
        gate = torch.sigmoid(features.mean(dim=(2, 3), keepdim=True))
        return self.fc((features * gate).mean(dim=(2, 3)))


def test_a_method_that_cannot_explain_the_model_is_reported_unavailable(tmp_path):
    torch.manual_seed(0)
    source = ModelSource(name="gated", description="GatedNet", model=GatedNet().eval(), input_size=(16, 16),
                         mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), class_names=("a", "b", "c"))
    settings = report.ReportSettings(images=4, cascade_images=2, steps=4, examples=1, methods=("saliency", "lrp"))
    document, _ = report.run(settings, source, progress=lambda line: None)
    assert set(document["methods"]) == {"saliency"}
    assert document["unavailable"]["lrp"]["code"] == "unsupported_model"
    assert document["unavailable"]["lrp"]["operation"] == "sigmoid"
    assert "`lrp` cannot explain this model: lrp has no relevance rule for: sigmoid" in report.markdown(document)


def test_picture_has_a_row_per_method_and_columns_per_example(tiny_report):
    picture = Image.open(tiny_report / "quality.png").convert("RGB")
    rows = len(explainers.available()) + 1  # every method, + the input/mask row
    columns = len(report.FIGURE_COLUMNS)
    block = columns * figure.TILE + (columns - 1) * figure.GAP
    assert picture.size == (figure.LABEL_WIDTH + 2 * block + figure.EXAMPLE_GAP + figure.GAP,
                            figure.HEADER_HEIGHT + rows * (figure.TILE + figure.GAP))
    # The input tile of the first example is the image, not a blank.
    tile = picture.crop((figure.LABEL_WIDTH, figure.HEADER_HEIGHT,
                         figure.LABEL_WIDTH + figure.TILE, figure.HEADER_HEIGHT + figure.TILE))
    assert len(np.unique(np.asarray(tile).reshape(-1, 3), axis=0)) > 1


def test_budgets_cap_the_expensive_methods_only():
    settings = report.ReportSettings(images=256, cascade_images=64)
    assert settings.budget("saliency") == report.Budget(256, 64)
    assert settings.budget("occlusion") == report.EXPENSIVE_BUDGETS["occlusion"]
    small = report.ReportSettings(images=6, cascade_images=3)
    assert small.budget("occlusion") == report.Budget(6, 3)


def test_cli_rejects_bad_counts(capsys):
    with pytest.raises(SystemExit):
        report.main(["--images", "0"])
    assert re.search(r"--images must be a positive integer", capsys.readouterr().err)


# --- other models: no masks, so localisation is not applicable ----------------------------------

LOCALISATION = ("pointing_game", "mask_energy")
TINY_METHODS = ["saliency", "grad_cam"]
REPO_ROOT = Path(__file__).resolve().parents[2]


def assert_localisation_not_applicable(document):
    assert document["localisation"]["applicable"] is False and "mask" in document["localisation"]["reason"]
    assert document["accuracy"] is None and document["mask_area"] is None
    for entry in [*document["methods"].values(), *document["references"].values()]:
        for metric in LOCALISATION:
            assert entry[metric] is None
        assert set(entry["not_applicable"]) == set(LOCALISATION)
        for metric in ("deletion_auc", "insertion_auc"):
            assert 0 <= entry[metric] <= 1


def test_torchvision_model_by_name_on_probes(tmp_path):
    report.main(["--out", str(tmp_path), "--torchvision", "resnet18", "--input-size", "64", "--images", "3",
                 "--cascade-images", "2", "--cascade-steps", "3", "--steps", "4", "--examples", "2",
                 "--methods", *TINY_METHODS])
    document = json.loads((tmp_path / "quality-torchvision-resnet18.json").read_text())
    assert document["input_size"] == [64, 64] and document["images"] == 3
    assert "probes" in document["images_from"] and "random weights" in document["model"]
    assert set(document["methods"]) == set(TINY_METHODS)
    assert_localisation_not_applicable(document)
    for entry in document["methods"].values():
        cascade = entry["randomization"]["cascade"]
        assert len(cascade) == 3 and cascade[0]["layer"] == "fc" and cascade[-1]["layer"] == "conv1"
    table = (tmp_path / "quality-torchvision-resnet18.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| `saliency` |"))
    assert [cell.strip() for cell in row.strip("|").split("|")][4:6] == ["n/a", "n/a"]
    assert "quality-torchvision-resnet18.png" in table and (tmp_path / "quality-torchvision-resnet18.png").exists()


def test_model_archive_with_sample_images(tmp_path):
    from tools.archive import archive_own_model

    torch.manual_seed(0)
    model_file = REPO_ROOT / "tests" / "fixtures" / "tiny_cnn.py"
    state = tmp_path / "tiny.pt"
    namespace = {}
    exec(compile(model_file.read_text(), str(model_file), "exec"), namespace)
    torch.save(namespace["TinyCNN"]().state_dict(), state)
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["ant", "bee", "cat"]))
    samples = []
    for index, colour in enumerate(((200, 30, 30), (30, 200, 30))):
        path = tmp_path / f"sample{index}.png"
        picture = Image.new("RGB", (48, 40), colour)
        picture.paste((255, 255, 255), (10, 10, 30, 30))
        picture.save(path)
        samples.append(path)
    mar = archive_own_model("tiny", model_file=model_file, serialized_file=state, class_names=names, input_size=32,
                            export_path=tmp_path / "store", mean=[0.5] * 3, std=[0.25] * 3, extra_files=samples)
    out = tmp_path / "reports"
    report.main(["--out", str(out), "--mar", str(mar), "--images", "4", "--cascade-images", "2", "--steps", "4",
                 "--examples", "2", "--methods", *TINY_METHODS])
    document = json.loads((out / "quality-tiny.json").read_text())
    assert document["images"] == 2 and "sample image" in document["images_from"]  # both samples, no probes
    assert document["input_size"] == [32, 32]
    assert_localisation_not_applicable(document)
    # The archive's model and preprocessing: TinyCNN has two layers for the cascade.
    assert [step["layer"] for step in document["methods"]["saliency"]["randomization"]["cascade"]] == [
        "classifier", "features.0"]


def test_sample_images_are_decoded_and_normalised_as_the_server_does(tmp_path):
    source = quality_sources.ModelSource(
        name="probe", description="", model=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2)),
        input_size=(4, 4), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), class_names=("a", "b"),
        sample_images=(np.full((3, 4, 4), 255, dtype=np.uint8),))
    data, origin = report.load_data(source, report.MODEL_DEFAULTS)
    assert data.masks is None and data.labels is None and "1 sample image" in origin
    torch.testing.assert_close(data.inputs, torch.full((1, 3, 4, 4), 2.0))  # (1 - 0.5) / 0.25


def test_probes_keep_the_shape_and_replace_the_background_with_noise():
    from demo import shapes

    probes = quality_sources.probe_images(3, seed=5, size=(48, 48))
    batch = shapes.generate(3, 5, size=48)
    mask = torch.from_numpy(batch.masks)[:, None].expand_as(probes)
    assert probes.shape == (3, 3, 48, 48) and 0 <= float(probes.min()) and float(probes.max()) <= 1
    torch.testing.assert_close(probes[mask], torch.from_numpy(batch.images)[mask])
    background = probes[~mask]
    assert 0.2 < float(background.std()) < 0.35  # uniform noise: std 0.29, not the shapes' smooth background
    assert quality_sources.probe_images(1, seed=5, size=(32, 40)).shape == (1, 3, 32, 40)  # non-square inputs


def test_generic_options_scale_occlusion_to_the_image():
    assert quality_sources.generic_explainer_options((224, 224))["occlusion"]["window"] == 28
    assert quality_sources.generic_explainer_options((64, 64))["occlusion"] == {
        "window": 8, "stride": 4, "perturbations_per_eval": 16}


def test_cli_rejects_weights_without_a_named_model(capsys):
    with pytest.raises(SystemExit):
        report.main(["--weights", "w.pt"])
    assert "--weights" in capsys.readouterr().err
