"""Served sanity checks through a real TorchServe, on the demo model: the describe API's custom
metadata, a response's verdicts, the gauge on the metrics address, and sanity_policy: refuse.

The demo archive carries its checks (measured when it was built, on its ten sample shapes), so the
model loads without measuring: the test checks that too, and that the checks of every allowed
explainer cost under 20 CPU-seconds (17 explainers: 11.5 on two otherwise idle cores, 13 for the first
nine on a busy machine before the CAM family came).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

from support import prom_text
from tools.archive import archive_model
from tools.demo_server import b64, build_store, post_json, running_server, shape_png
from tools.demo_store import CONFIG_FILE, HANDLER_FILE, MODEL_FILE, build_demo_store, sanity_members

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs java")

ALL_PASS = {"class_sensitive": True, "randomisation_sensitive": True}


def _add_refusing_model(store: Path) -> str:
    from demo.model_cache import BUILD_DIR

    config = yaml.safe_load(CONFIG_FILE.read_text())
    config["handler"]["sanity_policy"] = "refuse"
    config["handler"]["default_explainers"] = ["grad_cam"]
    work = store / ".shapes_refuse"
    work.mkdir()
    (work / "model-config.yaml").write_text(yaml.safe_dump(config))
    archive_model("shapes_refuse", model_file=MODEL_FILE, serialized_file=BUILD_DIR / "allconv_state.pt",
                  handler=HANDLER_FILE, export_path=store, config_file=work / "model-config.yaml",
                  extra_files=[BUILD_DIR / "index_to_name.json", sanity_members(build_demo_store(), work / "sanity")])
    return "shapes_refuse.mar"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = build_store(tmp_path_factory.mktemp("store"))
    models = {"shapes": "shapes.mar", "shapes_refuse": _add_refusing_model(store)}
    with running_server(store, tmp_path_factory.mktemp("run"), models) as running:
        yield running


def _custom_metadata(server, model: str) -> dict:
    reply = server.request("GET", f"/models/{model}?customized=true", api="management")
    assert reply.status == 200, reply.text
    (description,) = reply.json()
    return description["customizedMetadata"]


def test_describe_states_each_explainers_checks_on_the_demo_model(server):
    metadata = _custom_metadata(server, "shapes")
    # Every registered explainer can explain the demo model (lrp too: its instance norm has a rule).
    assert metadata["unavailable_explainers"] == []
    explainers = metadata["explainers"]
    assert set(explainers) >= {"saliency", "grad_cam", "guided_backprop", "integrated_gradients", "occlusion", "lrp"}
    sanity = {name: entry["sanity"] for name, entry in explainers.items()}
    # The README's verdicts (Nie et al.; Adebayo et al.): guided backprop ignores the class.
    assert sanity["guided_backprop"]["class_sensitive"] is False
    assert sanity["guided_backprop"]["class_map_similarity"] >= metadata["thresholds"]["max_class_map_similarity"]
    for name in ("grad_cam", "saliency"):
        assert {check: sanity[name][check] for check in ALL_PASS} == ALL_PASS, (name, sanity[name])
    for entry in sanity.values():
        assert set(entry) == {"class_sensitive", "randomisation_sensitive", "class_map_similarity",
                              "randomisation_similarity", "deletion_auc", "images"}
        assert entry["images"] == 10 and 0 <= entry["deletion_auc"] <= 1
    # Stored in the archive, so the load measured nothing; measuring them all cost under 15 CPU-seconds.
    assert metadata["probes"] == "sample_images" and metadata["measured_at_load_seconds"] == 0
    assert {entry["source"] for entry in explainers.values()} == {"archive"}
    assert sum(entry["cpu_seconds"] for entry in explainers.values()) < 20  # 17 explainers (11.5 s idle)


def test_each_explanation_entry_carries_its_verdicts(server):
    reply = post_json(server, "/predictions/shapes",
                      {"image": b64(shape_png("star")), "explain": ["guided_backprop", "grad_cam"]})
    assert reply.status == 200, reply.text
    explanations = reply.json()["explanations"]
    assert explanations["guided_backprop"]["sanity"]["class_sensitive"] is False
    assert explanations["grad_cam"]["sanity"] == ALL_PASS
    assert not any("warnings" in entry for entry in explanations.values())  # the demo's policy: report


def test_refuse_turns_a_failing_explainer_away_with_a_typed_403(server):
    refused = post_json(server, "/predictions/shapes_refuse",
                        {"image": b64(shape_png("circle")), "explain": ["guided_backprop"]})
    assert refused.status == 403, refused.text
    error = refused.json()["error"]
    assert error["code"] == "explainer_fails_sanity" and "class_sensitive" in error["failed_checks"]
    served = post_json(server, "/predictions/shapes_refuse", {"image": b64(shape_png("circle")), "explain": ["saliency"]})
    assert served.status == 200 and served.json()["explanations"]["saliency"]["sanity"] == ALL_PASS


def test_the_gauge_is_on_the_metrics_address(server):
    expected = {("guided_backprop", "class_sensitive"): 0.0, ("grad_cam", "class_sensitive"): 1.0,
                ("grad_cam", "randomisation_sensitive"): 1.0, ("saliency", "randomisation_sensitive"): 1.0}
    deadline, found = time.monotonic() + 5, {}
    while time.monotonic() < deadline:  # the worker's metric lines reach the frontend up to ~50 ms late
        samples = prom_text.parse(server.request("GET", "/metrics", api="metrics").text)
        found = {(labels["explainer"], labels["check"]): value
                 for labels, value in samples.get("xai_explainer_sanity", []) if labels["ModelName"] == "shapes"}
        if all(key in found for key in expected):
            break
        time.sleep(0.1)
    assert {key: found.get(key) for key in expected} == expected
    metadata = _custom_metadata(server, "shapes")
    measured = set(metadata["explainers"]) - set(metadata["unavailable_explainers"])  # those have no checks, no gauge
    assert set(found) == {(name, check) for name in measured for check in ALL_PASS}
