"""``python -m tools.quality_report``: a tiny real run, its JSON layout, table and picture."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

import explainers
from tools import quality_figure as figure, quality_report as report

HEADLINE = ("deletion_auc", "insertion_auc", "pointing_game", "mask_energy", "class_map_similarity",
            "randomization_similarity")
UNIT_INTERVAL = ("deletion_auc", "insertion_auc", "pointing_game", "mask_energy")
DEMO_CASCADE = ["classifier", "features.15", "features.12", "features.9", "features.6", "features.3", "features.0"]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    report.main(["--out", str(out), "--images", "6", "--cascade-images", "3", "--steps", "4", "--examples", "2"])
    return out


def test_json_layout(tiny_report):
    document = json.loads((tiny_report / "quality.json").read_text())  # strict JSON: no NaN
    assert isinstance(document["model"], str) and "AllConvNet" in document["model"]
    assert document["images"] == 6
    assert set(document["methods"]) == set(explainers.available())
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


def test_picture_has_a_row_per_method_and_columns_per_example(tiny_report):
    picture = Image.open(tiny_report / "quality.png").convert("RGB")
    rows = len(explainers.available()) + 1  # + the input/mask row
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
