"""Served sanity checks: the scores on hand-checkable models, the verdicts from thresholds, the
stored results and their staleness, and the served model left exactly as it was."""

import json
import math

import pytest
import torch
from torch import nn

from explainers.errors import InvalidOptionError
from explainers.evaluation.sanity import SanityScores, evaluated_steps, fingerprint, model_digest, sanity_scores
from serving import sanity as served
from serving.sanity import ExplainerSanity, SanityReport, SanitySettings, generated_probes, measure
from serving.settings import ServingSettings
from support.models import MixedReluNet, ModuleReluNet, seeded


class LinearClassifier(nn.Module):
    """logits = W · flatten(x): the saliency map of class c is |W_c| itself."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(weight)

    def forward(self, x):
        return self.linear(x.flatten(1))


class WeightBlindClassifier(nn.Module):
    """Its logits' gradient comes from a buffer (never randomised); the layer with weights adds 0."""

    def __init__(self, pattern: torch.Tensor):
        super().__init__()
        self.register_buffer("pattern", pattern)
        self.linear = nn.Linear(pattern.shape[1], pattern.shape[0])

    def forward(self, x):
        flat = x.flatten(1)
        return flat @ self.pattern.T + 0.0 * self.linear(flat)


def _inputs(rows=4, size=4, seed=0):
    return torch.rand(rows, 1, size, size, generator=torch.Generator().manual_seed(seed)) + 0.5


def test_a_map_that_ignores_the_class_scores_one_and_an_opposite_ranking_minus_one():
    pixels = 16
    ramp = torch.arange(1.0, pixels + 1)
    # Class 1 dominates on positive inputs (top), class 0 is least likely: |W_0| = |W_1| -> same map.
    same = LinearClassifier(torch.stack([-ramp, ramp]))
    scores = sanity_scores(same, "saliency", _inputs(), randomisation_steps=1, deletion_steps=4)
    assert scores.class_map_similarity == pytest.approx(1.0)
    # |W_0| ranks the pixels in reverse: Spearman -1 on every probe.
    opposite = LinearClassifier(torch.stack([-ramp.flip(0) * 0.01, ramp]))
    scores = sanity_scores(opposite, "saliency", _inputs(), randomisation_steps=1, deletion_steps=4)
    assert scores.class_map_similarity == pytest.approx(-1.0)
    assert scores.images == 4 and scores.randomised_layers == ("linear",)


def test_a_map_that_ignores_the_weights_scores_one_under_randomisation():
    pattern = torch.stack([torch.arange(16.0), -torch.arange(16.0)])
    blind = WeightBlindClassifier(pattern)
    scores = sanity_scores(blind, "saliency", _inputs(), randomisation_steps=4, deletion_steps=4)
    assert scores.randomisation_similarity == pytest.approx(1.0)
    # The same map from the weights themselves changes when they are redrawn.
    learned = LinearClassifier(pattern)
    assert sanity_scores(learned, "saliency", _inputs(), randomisation_steps=4,
                         deletion_steps=4).randomisation_similarity < 0.9


@pytest.mark.parametrize("layers, steps, expected", [
    (7, 8, [0, 1, 2, 3, 4, 5, 6]), (7, 7, [0, 1, 2, 3, 4, 5, 6]), (50, 4, [12, 24, 37, 49]), (10, 1, [9]),
    (3, 2, [1, 2])])
def test_evaluated_steps_are_evenly_spaced_and_end_with_everything_randomised(layers, steps, expected):
    assert evaluated_steps(layers, steps) == expected


def _scores(class_similarity, randomisation_similarity):
    return SanityScores(class_similarity, randomisation_similarity, 0.3, 10, ("fc",), 1.0, 0.5)


@pytest.mark.parametrize("class_similarity, randomisation_similarity, verdicts", [
    (0.84, 0.49, {"class_sensitive": True, "randomisation_sensitive": True}),
    (0.85, 0.49, {"class_sensitive": False, "randomisation_sensitive": True}),   # at the threshold: fails
    (0.10, 0.50, {"class_sensitive": True, "randomisation_sensitive": False}),
    (math.nan, -0.2, {"class_sensitive": False, "randomisation_sensitive": True}),  # no evidence: fails
])
def test_verdicts_from_the_default_thresholds(class_similarity, randomisation_similarity, verdicts):
    record = {"fingerprint": "x", "scores": _scores(class_similarity, randomisation_similarity).to_dict()}
    entry = served._entry(record, {}, SanitySettings(), "archive")
    assert entry.verdicts == verdicts
    assert entry.failed_checks == tuple(check for check, ok in verdicts.items() if not ok)


def test_thresholds_come_from_the_model_config_and_bad_ones_fail_the_load():
    section = {"input_size": 16, "class_names": ["a", "b", "c"], "sanity_policy": "warn",
               "sanity": {"max_class_map_similarity": 0.5, "explainer_options": {"occlusion": {"stride": 4}}}}
    settings = ServingSettings.from_mapping(section)
    assert settings.sanity_policy == "warn" and settings.sanity.max_class_map_similarity == 0.5
    # the served options made cheaper, never costlier, then the model's own check options
    assert settings.sanity.check_options("occlusion", {"window": 8, "stride": 2}) == {"window": 8, "stride": 4}
    assert settings.sanity.check_options("integrated_gradients", {"n_steps": 64, "internal_batch_size": 4}) == {
        "n_steps": 8, "internal_batch_size": 4}
    assert settings.sanity.check_options("integrated_gradients", {"n_steps": 5}) == {"n_steps": 5}
    assert settings.sanity.check_options("smoothgrad", {"samples": 16, "noise": 0.1}) == {"samples": 4, "noise": 0.1}
    default = SanitySettings()
    assert default.check_options("occlusion", {"window": 8, "stride": 4}) == {"window": 8, "stride": 8}
    assert default.check_options("occlusion", {"window": 2, "stride": 1}) == {"window": 2, "stride": 2}
    assert default.check_options("occlusion", {"window": 4, "stride": 6}) == {"window": 4, "stride": 6}
    assert ServingSettings.from_mapping({"input_size": 16, "class_names": ["a", "b", "c"]}).sanity_policy == "report"
    for bad in ({"sanity_policy": "ignore"}, {"sanity": {"max_class_map_similarity": 2}},
                {"sanity": {"threshold": 0.5}}, {"sanity": {"probe_images": 0}},
                {"sanity": {"explainer_options": {"lime": {}}}}):
        with pytest.raises((InvalidOptionError, KeyError)):
            ServingSettings.from_mapping({"input_size": 16, "class_names": ["a", "b", "c"], **bad})


def test_generated_probes_are_reproducible_images():
    first, second = generated_probes(5, (24, 32)), generated_probes(5, (24, 32))
    assert first.dtype == torch.uint8 and first.shape == (5, 3, 24, 32)
    assert torch.equal(first, second) and not torch.equal(first[0], first[1])
    assert all(float(image.float().std()) > 10 for image in first)  # something to rank, not a flat colour


def _model_state(model: nn.Module) -> dict:
    hooks = {name: [len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                    len(m._backward_pre_hooks)] for name, m in model.named_modules()}
    module_globals = nn.modules.module
    return {
        "state": {name: tensor.clone() for name, tensor in model.state_dict(keep_vars=False).items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grads": {name: p.grad is None for name, p in model.named_parameters()},
        "hooks": hooks,
        "global_hooks": [len(module_globals._global_forward_hooks), len(module_globals._global_forward_pre_hooks),
                         len(module_globals._global_backward_hooks)],
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "rng": torch.random.get_rng_state(),
    }


def _assert_same_state(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for name, tensor in before["state"].items():
        assert torch.equal(tensor, after["state"][name]), name
    for key in ("training", "requires_grad", "grads", "hooks", "global_hooks", "modules"):
        assert before[key] == after[key], key
    assert torch.equal(before["rng"], after["rng"])  # the checks' random draws come from a forked RNG


# SmoothGrad (Captum's NoiseTunnel) cannot explain MixedReluNet's in-place ReLUs, served or checked.
@pytest.mark.parametrize("model_class, methods", [
    (ModuleReluNet, ["saliency", "guided_backprop", "grad_cam", "smoothgrad"]),
    (MixedReluNet, ["saliency", "guided_backprop", "deconvnet", "integrated_gradients"])])
def test_the_checks_leave_the_served_model_exactly_as_it_was(model_class, methods):
    model = seeded(model_class(classes=4))
    # Flags a careless check would reset: one module in training mode, one frozen parameter.
    model.train()
    next(model.parameters()).requires_grad_(False)
    before = _model_state(model)
    inputs = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    report, _ = measure(model, methods, {}, inputs,
                        SanitySettings(randomisation_steps=2, deletion_steps=4))
    assert all(entry.scores is not None for entry in report.explainers.values()), report.describe()
    _assert_same_state(before, _model_state(model))


def test_stored_results_are_reused_while_fresh_and_measured_again_when_stale(monkeypatch):
    model = seeded(ModuleReluNet(classes=4))
    inputs = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    settings = SanitySettings(randomisation_steps=1, deletion_steps=2)
    report, document = measure(model, ["saliency", "grad_cam"], {}, inputs, settings)
    assert {entry.source for entry in report.explainers.values()} == {"measured"} and report.measure_seconds > 0

    def must_not_measure(*args, **kwargs):
        raise AssertionError("a fresh stored result was measured again")

    monkeypatch.setattr(served, "sanity_scores", must_not_measure)
    again, _ = measure(model, ["saliency", "grad_cam"], {}, inputs, settings, json.loads(json.dumps(document)))
    assert {entry.source for entry in again.explainers.values()} == {"archive"} and again.measure_seconds == 0
    assert again.describe()["explainers"] == {
        name: {**entry, "source": "archive"} for name, entry in report.describe()["explainers"].items()}
    monkeypatch.undo()

    # New weights, other options, other probes: each makes the stored result stale.
    weights = model_digest(model)
    key = fingerprint(weights, "saliency", {}, inputs)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert model_digest(model) != weights
    assert fingerprint(weights, "saliency", {"abs": False}, inputs) != key
    assert fingerprint(weights, "saliency", {}, inputs + 1) != key
    restale, _ = measure(model, ["saliency"], {}, inputs, settings, document)
    assert restale.explainers["saliency"].source == "measured"


def test_an_explainer_that_cannot_run_or_costs_too_much_gets_an_error_entry_not_a_failed_load():
    model = seeded(ModuleReluNet(classes=4))
    inputs = torch.randn(2, 3, 16, 16)
    settings = SanitySettings(randomisation_steps=1, deletion_steps=2, max_evaluations=200)
    report, _ = measure(model, ["saliency", "occlusion", "guided_backprop"], {"occlusion": {"window": 2}}, inputs,
                        settings)
    assert report.explainers["saliency"].scores is not None
    occlusion = report.describe()["explainers"]["occlusion"]
    assert occlusion["sanity"] is None and occlusion["error"]["code"] == "sanity_check_too_costly"
    assert report.verdicts("occlusion") is None and report.failed_checks("occlusion") == ()
    # a CPU-time limit smaller than any check: nothing is measured, every entry says why
    starving = SanitySettings(randomisation_steps=1, deletion_steps=2, max_cpu_seconds=1e-9)
    starved, document = measure(model, ["saliency", "grad_cam"], {}, inputs, starving)
    assert {entry.error["code"] for entry in starved.explainers.values()} == {"sanity_check_too_costly"}
    assert "CPU-seconds" in starved.explainers["saliency"].error["message"]
    # stored, the refusal stands under the same limits and is measured again under others
    assert {e.source for e in measure(model, ["saliency"], {}, inputs, starving, document)[0].explainers.values()} == {
        "archive"}
    assert measure(model, ["saliency"], {}, inputs, settings, document)[0].explainers["saliency"].scores is not None
    # a rule method on a model without any activation cannot explain it
    linear = LinearClassifier(torch.randn(2, 16))
    report, _ = measure(linear, ["saliency", "guided_backprop"], {}, _inputs(), settings)
    assert report.explainers["saliency"].scores is not None
    assert report.describe()["explainers"]["guided_backprop"]["error"]["code"] == "unsupported_model"


def test_the_report_describes_gauges_and_warns():
    report = SanityReport({"guided_backprop": served._entry(
        {"scores": _scores(0.92, 0.64).to_dict()}, {}, SanitySettings(), "archive"),
        "grad_cam": served._entry({"scores": _scores(-0.16, 0.02).to_dict()}, {}, SanitySettings(), "archive"),
    }, SanitySettings(), "sample_images")
    described = report.describe()["explainers"]["guided_backprop"]["sanity"]
    assert described == {"class_sensitive": False, "randomisation_sensitive": False, "class_map_similarity": 0.92,
                         "randomisation_similarity": 0.64, "deletion_auc": 0.3, "images": 10}
    assert sorted(report.gauge_values()) == [
        ("grad_cam", "class_sensitive", 1.0), ("grad_cam", "randomisation_sensitive", 1.0),
        ("guided_backprop", "class_sensitive", 0.0), ("guided_backprop", "randomisation_sensitive", 0.0)]
    warnings = report.warnings("guided_backprop")
    assert len(warnings) == 2 and "class" in warnings[0] and "0.92" in warnings[0] and "randomised" in warnings[1]
    assert report.warnings("grad_cam") == [] and isinstance(ExplainerSanity({}).describe()["error"], dict)
