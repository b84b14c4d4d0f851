"""sanity_policy in the request service: report (verdicts in each entry), warn (and a warning per
failed check), refuse (a typed 403 naming the failed checks); the gauge set at construction."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from explainers.evaluation.sanity import SanityScores
from serving import sanity as served
from serving.metrics import prometheus_metrics
from serving.requests import RawRequest
from serving.sanity import SanityReport, load_or_measure
from serving.service import ExplanationService
from serving.settings import ServingSettings
from support.models import ModuleReluNet, seeded

CLASSES = ["circle", "square", "triangle", "cross"]


def _settings(policy: str) -> ServingSettings:
    return ServingSettings.from_mapping({"input_size": [16, 16], "class_names": CLASSES, "top_k": 2,
                                         "default_explainers": ["grad_cam"], "sanity_policy": policy})


def _report(settings: ServingSettings) -> SanityReport:
    """guided_backprop fails the class check only; grad_cam passes both (scores as on the demo model)."""
    def entry(class_similarity, randomisation_similarity):
        scores = SanityScores(class_similarity, randomisation_similarity, 0.3, 10, ("fc",), 1.0, 0.5)
        return served._entry({"scores": scores.to_dict()}, {}, settings.sanity, "archive")

    return SanityReport({"guided_backprop": entry(0.92, 0.3), "grad_cam": entry(-0.16, 0.02)}, settings.sanity,
                        "sample_images")


def _request(*explainers: str) -> RawRequest:
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return RawRequest({"body": {"image": base64.b64encode(buffer.getvalue()).decode(), "explain": list(explainers)}},
                      {}, False)


def _service(policy: str, metrics=None) -> ExplanationService:
    settings = _settings(policy)
    return ExplanationService(seeded(ModuleReluNet(classes=4)), settings, metrics, sanity=_report(settings))


def test_report_puts_the_verdicts_in_every_entry_and_warns_of_nothing():
    reply = _service("report").handle([_request("guided_backprop", "grad_cam")])[0]
    assert reply.status == 200, reply.body
    explanations = reply.body["explanations"]
    assert explanations["guided_backprop"]["sanity"] == {"class_sensitive": False, "randomisation_sensitive": True}
    assert explanations["grad_cam"]["sanity"] == {"class_sensitive": True, "randomisation_sensitive": True}
    assert not any("warnings" in entry for entry in explanations.values())


def test_warn_adds_what_the_failed_check_means_to_the_failing_explainer_only():
    reply = _service("warn").handle([_request("guided_backprop", "grad_cam")])[0]
    assert reply.status == 200, reply.body
    explanations = reply.body["explanations"]
    (warning,) = explanations["guided_backprop"]["warnings"]
    assert "class sensitivity" in warning and "0.92" in warning and "0.85" in warning
    assert explanations["guided_backprop"]["sanity"]["class_sensitive"] is False
    assert "warnings" not in explanations["grad_cam"]


def test_refuse_answers_403_naming_the_failed_check_and_serves_explainers_that_pass():
    service = _service("refuse")
    refused, served_ok = service.handle([_request("guided_backprop", "grad_cam"), _request("grad_cam")])
    assert refused.status == 403
    error = refused.body["error"]
    assert error["code"] == "explainer_fails_sanity" and error["cap"] == "sanity_policy"
    assert error["failed_checks"] == ["class_sensitive"] and "guided_backprop" in error["message"]
    assert served_ok.status == 200 and served_ok.body["explanations"]["grad_cam"]["sanity"]["class_sensitive"]


def test_without_a_report_no_policy_applies_and_entries_carry_no_verdicts():
    service = ExplanationService(seeded(ModuleReluNet(classes=4)), _settings("refuse"))
    reply = service.handle([_request("guided_backprop")])[0]
    assert reply.status == 200 and "sanity" not in reply.body["explanations"]["guided_backprop"]


def test_the_gauge_holds_each_check_of_each_measured_explainer():
    metrics = prometheus_metrics()
    _service("report", metrics)
    registry = metrics.recorder.registry
    value = lambda explainer, check: registry.get_sample_value(  # noqa: E731
        "xai_explainer_sanity", {"explainer": explainer, "check": check})
    assert value("guided_backprop", "class_sensitive") == 0.0
    assert value("guided_backprop", "randomisation_sensitive") == 1.0
    assert value("grad_cam", "class_sensitive") == 1.0 and value("grad_cam", "randomisation_sensitive") == 1.0


def test_load_or_measure_measures_with_generated_probes_and_caches_beside_the_model(tmp_path):
    settings = ServingSettings.from_mapping({
        "input_size": [16, 16], "class_names": CLASSES, "top_k": 2, "default_explainers": ["saliency"],
        "allowed_explainers": ["saliency", "grad_cam"], "sanity": {"randomisation_steps": 2, "probe_images": 3}})
    model = seeded(ModuleReluNet(classes=4))
    report = load_or_measure(model, settings, tmp_path)
    assert report.probes == "generated" and report.measure_seconds > 0
    assert {name: entry.scores.images for name, entry in report.explainers.items()} == {"saliency": 3, "grad_cam": 3}
    assert (tmp_path / "sanity.json").is_file()
    again = load_or_measure(model, settings, tmp_path)  # a restarted worker: nothing measured
    assert again.measure_seconds == 0 and again.describe()["explainers"]["saliency"]["source"] == "archive"


@pytest.mark.parametrize("policy", ["report", "warn", "refuse"])
def test_predict_only_requests_are_never_refused(policy):
    service = _service(policy)
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    reply = service.handle([RawRequest({"body": buffer.getvalue()}, {}, False)])[0]
    assert reply.status == 200 and set(reply.body) == {"predictions"}
