"""The "quality" flag through a real TorchServe: scores in the reply, the histogram on /metrics."""

from __future__ import annotations

import time

import pytest
import yaml

from demo.model_cache import BUILD_DIR, trained_demo_model
from serving.requests import RawRequest
from serving.service import ExplanationService
from serving.settings import ServingSettings
from tools.demo_store import CONFIG_FILE
from support.prom_text import parse
from tools.demo_server import b64, build_store, post_json, running_server, shape_png

METHODS = ["grad_cam", "saliency"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = build_store(tmp_path_factory.mktemp("store"))
    with running_server(store, tmp_path_factory.mktemp("run"), {"shapes": "shapes.mar"}) as server:
        yield server


def quality_samples(server, name: str) -> dict[str, float]:
    """``{explainer: value}`` of one xai_explanation_quality sample for the deletion AUC."""
    samples = parse(server.request("GET", "/metrics", api="metrics").text).get(name, [])
    return {labels["explainer"]: value for labels, value in samples
            if labels.get("metric") == "deletion_auc" and labels.get("ModelName") == "shapes"}


def test_quality_scores_in_the_reply_and_on_metrics(server):
    image = shape_png("star")
    plain = post_json(server, "/predictions/shapes", {"image": b64(image), "explain": METHODS})
    scored = post_json(server, "/predictions/shapes", {"image": b64(image), "explain": METHODS, "quality": True})
    assert plain.status == 200 and scored.status == 200, scored.text
    assert all("quality" not in entry for entry in plain.json()["explanations"].values())
    served = {name: entry["quality"]["deletion_auc"] for name, entry in scored.json()["explanations"].items()}

    # The same request through the service in this process, with the demo's own config: the
    # server computed the score the layer under test computes.
    section = yaml.safe_load(CONFIG_FILE.read_text())["handler"]
    local = ExplanationService(trained_demo_model(), ServingSettings.from_mapping(section, BUILD_DIR))
    document = {"image": b64(image), "explain": METHODS, "quality": True}
    expected = local.handle([RawRequest({"body": document})])[0].body["explanations"]
    for name in METHODS:
        assert 0 <= served[name] <= 1
        assert served[name] == pytest.approx(expected[name]["quality"]["deletion_auc"], abs=2e-3)
    # grad_cam's map is the object: deleting it first must drop the star's probability early.
    assert served["grad_cam"] < 0.5

    capped = post_json(server, "/predictions/shapes", {"image": b64(image), "explain": ["saliency"], "quality": {"steps": 64}})
    assert (capped.status, capped.json()["error"]["code"]) == (422, "cost_cap_exceeded")

    # TorchServe's frontend publishes backend metrics shortly after the reply.
    deadline = time.monotonic() + 15
    while True:
        counts = quality_samples(server, "xai_explanation_quality_count")
        if all(counts.get(name) == 1 for name in METHODS) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert {name: counts.get(name) for name in METHODS} == {name: 1 for name in METHODS}
    sums = quality_samples(server, "xai_explanation_quality_sum")
    for name in METHODS:
        assert sums[name] == pytest.approx(served[name], abs=1e-3)
