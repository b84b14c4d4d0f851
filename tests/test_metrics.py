"""explainers.metrics: the vocabulary records the right names, labels and values, into a
prometheus_client registry and through TorchServe's metrics cache, and the TorchServe backend emits
exactly what deploy/torchserve/metrics.yaml declares (names, types, label arity and order)."""

from __future__ import annotations

import base64
import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from prometheus_client import CollectorRegistry
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.metrics.metric_type_enum import MetricTypes

from explainers import metrics as xm
from explainers.metrics import Metrics, NullRecorder, PrometheusRecorder, TorchServeRecorder, prometheus_metrics
from explainers.serving.requests import RawRequest
from explainers.serving.service import ExplanationService
from explainers.serving.settings import ServingSettings
from support.models import ModuleReluNet, seeded

METRICS_YAML = Path(__file__).resolve().parents[1] / "deploy" / "torchserve" / "metrics.yaml"
TYPES = {"counter": MetricTypes.COUNTER, "gauge": MetricTypes.GAUGE, "histogram": MetricTypes.HISTOGRAM}


class FakeClock:
    """Stands in for the ``time`` module of explainers.metrics: perf_counter() returns set values."""

    def __init__(self, *readings: float):
        self.readings = list(readings)

    def perf_counter(self) -> float:
        return self.readings.pop(0)


def sample(registry: CollectorRegistry, name: str, **labels) -> float | None:
    return registry.get_sample_value(name, labels)


def label_sets(registry: CollectorRegistry) -> dict[str, set[tuple]]:
    """{sample name: {sorted label items}} of everything in the registry."""
    out: dict[str, set[tuple]] = {}
    for family in registry.collect():
        for s in family.samples:
            out.setdefault(s.name, set()).add(tuple(sorted(s.labels.items())))
    return out


# ---- the vocabulary into prometheus_client -------------------------------------------------------

def test_request_series_start_at_zero():
    metrics = prometheus_metrics()
    registry = metrics.recorder.registry
    for route in ("predict", "explain"):
        for outcome in ("ok", "client_error", "server_error"):
            assert sample(registry, "xai_requests_total", route=route, outcome=outcome) == 0.0
    assert len(label_sets(registry)["xai_requests_total"]) == 6
    # nothing else has a series yet (histograms and other counters appear on first use)
    assert sample(registry, "xai_errors_total", code="internal") is None
    assert sample(registry, "xai_stage_latency_seconds_count", stage="decode", explainer="none") is None


def test_every_declared_metric_is_registered_under_its_name():
    registry = prometheus_metrics().recorder.registry
    families = {family.name: family.type for family in registry.collect()}
    # prometheus_client names counter families without _total; samples carry it
    expected = {spec.name.removesuffix("_total"): spec.kind for spec in xm.ALL_METRICS}
    assert families == expected


def test_stage_timer_observes_seconds_into_the_right_buckets(monkeypatch):
    metrics = prometheus_metrics()
    registry = metrics.recorder.registry
    monkeypatch.setattr(xm, "time", FakeClock(10.0, 10.003, 20.0, 20.2, 30.0, 30.2))
    with metrics.stage("decode"):
        pass
    with metrics.stage("decode"):
        pass
    with metrics.stage("explain", "grad_cam"):
        pass
    decode = {"stage": "decode", "explainer": "none"}
    assert sample(registry, "xai_stage_latency_seconds_count", **decode) == 2
    assert sample(registry, "xai_stage_latency_seconds_sum", **decode) == pytest.approx(0.203)
    cumulative = {le: sample(registry, "xai_stage_latency_seconds_bucket", le=le, **decode)
                  for le in ("0.001", "0.0025", "0.005", "0.1", "0.25", "30.0", "+Inf")}
    assert cumulative == {"0.001": 0, "0.0025": 0, "0.005": 1, "0.1": 1, "0.25": 2, "30.0": 2, "+Inf": 2}
    assert sample(registry, "xai_stage_latency_seconds_count", stage="explain", explainer="grad_cam") == 1
    assert sample(registry, "xai_stage_latency_seconds_sum", stage="explain", explainer="grad_cam") == pytest.approx(0.2)
    les = sorted({dict(labels)["le"] for labels in label_sets(registry)["xai_stage_latency_seconds_bucket"]},
                 key=lambda le: float(le))
    assert les == [str(b) for b in xm.LATENCY_BUCKETS] + ["+Inf"]


def test_stage_timer_records_also_when_the_block_raises(monkeypatch):
    metrics = prometheus_metrics()
    registry = metrics.recorder.registry
    monkeypatch.setattr(xm, "time", FakeClock(1.0, 1.5))
    with pytest.raises(ValueError, match="boom"):
        with metrics.stage("explain", "occlusion"):
            raise ValueError("boom")
    labels = {"stage": "explain", "explainer": "occlusion"}
    assert sample(registry, "xai_stage_latency_seconds_count", **labels) == 1
    assert sample(registry, "xai_stage_latency_seconds_sum", **labels) == pytest.approx(0.5)
    assert sample(registry, "xai_stage_latency_seconds_bucket", le="0.25", **labels) == 0
    assert sample(registry, "xai_stage_latency_seconds_bucket", le="0.5", **labels) == 1


@pytest.mark.parametrize("status,outcome", [
    (200, "ok"), (204, "ok"), (302, "ok"),
    (400, "client_error"), (403, "client_error"), (413, "client_error"), (422, "client_error"), (499, "client_error"),
    (500, "server_error"), (503, "server_error"), (507, "server_error"),
])
def test_outcome_of_status(status, outcome):
    assert xm.outcome_of(status) == outcome


def test_request_outcomes_from_statuses():
    metrics = prometheus_metrics()
    registry = metrics.recorder.registry
    for route, status in [("predict", 200), ("predict", 200), ("predict", 400), ("predict", 413),
                          ("explain", 200), ("explain", 422), ("explain", 500), ("explain", 503), ("explain", 503)]:
        metrics.request(route, status)
    counts = {(route, outcome): sample(registry, "xai_requests_total", route=route, outcome=outcome)
              for route in ("predict", "explain") for outcome in ("ok", "client_error", "server_error")}
    assert counts == {("predict", "ok"): 2, ("predict", "client_error"): 2, ("predict", "server_error"): 0,
                      ("explain", "ok"): 1, ("explain", "client_error"): 1, ("explain", "server_error"): 3}


def test_errors_explanations_bytes_and_quality():
    metrics = prometheus_metrics()
    registry = metrics.recorder.registry
    metrics.error("invalid_image")
    metrics.error("invalid_image")
    metrics.error("cost_cap_exceeded")
    metrics.explanation("grad_cam", ok=True, payload_bytes=1000)
    metrics.explanation("grad_cam", ok=True, payload_bytes=70000)
    metrics.explanation("grad_cam", ok=False)
    metrics.quality("grad_cam", "deletion_auc", 0.42)
    assert sample(registry, "xai_errors_total", code="invalid_image") == 2
    assert sample(registry, "xai_errors_total", code="cost_cap_exceeded") == 1
    assert sample(registry, "xai_explanations_total", explainer="grad_cam", outcome="ok") == 2
    assert sample(registry, "xai_explanations_total", explainer="grad_cam", outcome="error") == 1
    assert sample(registry, "xai_explanation_bytes_count", explainer="grad_cam") == 2  # failures carry no payload
    assert sample(registry, "xai_explanation_bytes_sum", explainer="grad_cam") == 71000
    assert sample(registry, "xai_explanation_bytes_bucket", explainer="grad_cam", le="1024.0") == 1
    assert sample(registry, "xai_explanation_bytes_bucket", explainer="grad_cam", le="65536.0") == 1
    assert sample(registry, "xai_explanation_bytes_bucket", explainer="grad_cam", le="262144.0") == 2
    assert sample(registry, "xai_explanation_quality_sum", explainer="grad_cam", metric="deletion_auc") == pytest.approx(0.42)
    assert sample(registry, "xai_explanation_quality_bucket", explainer="grad_cam", metric="deletion_auc", le="0.4") == 0
    assert sample(registry, "xai_explanation_quality_bucket", explainer="grad_cam", metric="deletion_auc", le="0.5") == 1


def test_a_given_registry_is_used_and_null_recorder_records_nothing():
    registry = CollectorRegistry()
    metrics = prometheus_metrics(registry)
    assert isinstance(metrics.recorder, PrometheusRecorder) and metrics.recorder.registry is registry
    assert sample(registry, "xai_requests_total", route="predict", outcome="ok") == 0
    null = Metrics()
    assert isinstance(null.recorder, NullRecorder)
    with null.stage("decode"):
        null.request("predict", 200)


# ---- the TorchServe backend --------------------------------------------------------------------

def declared_model_metrics() -> dict[str, tuple[MetricTypes, list[str]]]:
    """deploy/torchserve/metrics.yaml's model metrics: name -> (type, dimension names in order)."""
    config = yaml.safe_load(METRICS_YAML.read_text())
    return {entry["name"]: (TYPES[kind], list(entry["dimensions"]))
            for kind, entries in config["model_metrics"].items() for entry in entries}


class FakeMetric:
    def __init__(self, cache: "FakeMetricsCache", name: str):
        self.cache, self.name = cache, name

    def add_or_update(self, value, dimension_values=(), request_id=""):
        self.cache.calls.append(("add_or_update", self.name, value, list(dimension_values)))


class FakeMetricsCache:
    """A stand-in for context.metrics that only knows what metrics.yaml declares, and records calls."""

    def __init__(self):
        self.declared = declared_model_metrics()
        self.calls: list[tuple] = []

    def get_metric(self, name, metric_type=MetricTypes.COUNTER):
        self.calls.append(("get_metric", name, metric_type))
        if name not in self.declared or self.declared[name][0] != metric_type:
            raise KeyError(f"{metric_type}:{name} is not declared in metrics.yaml")  # as MetricsCacheKeyError
        return FakeMetric(self, name)

    def updates(self):
        return [call[1:] for call in self.calls if call[0] == "add_or_update"]

    # TorchServe's convenience calls put ModelName/Level last: the recorder must never use them.
    def add_metric(self, *args, **kwargs):
        raise AssertionError("add_metric mislabels metrics declared with ModelName, Level first")

    add_time = add_counter = add_size = add_percent = add_metric


def torchserve_metrics(cache, model_name="shapes") -> Metrics:
    return Metrics(TorchServeRecorder(cache, model_name, MetricTypes.COUNTER, MetricTypes.HISTOGRAM))


def assert_declared(cache: FakeMetricsCache, model_name="shapes"):
    """Every update names a declared metric and gives one value per declared dimension, in order."""
    for name, value, values in cache.updates():
        assert name in cache.declared, f"{name} is not declared in metrics.yaml (the frontend drops it)"
        dimensions = cache.declared[name][1]
        assert len(values) == len(dimensions), (name, values, dimensions)
        assert values[:2] == [model_name, "Model"], (name, values)
        for value_ in values:
            assert isinstance(value_, str) and value_ and not re.search(r"[,:|]", value_), (name, values)
        assert isinstance(value, (int, float)) and value >= 0, (name, value)


def test_recorder_fetches_each_declared_metric_once_with_its_type():
    cache = FakeMetricsCache()
    torchserve_metrics(cache)
    fetched = [call[1:] for call in cache.calls if call[0] == "get_metric"]
    assert sorted(fetched, key=str) == sorted(
        [(spec.name, TYPES[spec.kind]) for spec in xm.ALL_METRICS], key=str)
    # everything our handler declares in metrics.yaml is fetched (TorchServe's HandlerTime and
    # PredictionTime gauges are ts's own)
    ours = {name for name in cache.declared if name.startswith("xai_")}
    assert ours == {spec.name for spec in xm.ALL_METRICS}


def test_recorder_refuses_to_start_against_a_config_without_our_metrics():
    cache = FakeMetricsCache()
    del cache.declared["xai_errors_total"]
    with pytest.raises(KeyError, match="xai_errors_total"):
        torchserve_metrics(cache)


def test_recorder_emits_model_name_level_then_our_labels(monkeypatch):
    cache = FakeMetricsCache()
    metrics = torchserve_metrics(cache)
    zero = cache.updates()
    assert zero == [("xai_requests_total", 0, ["shapes", "Model", route, outcome])
                    for route in ("predict", "explain") for outcome in ("ok", "client_error", "server_error")]
    cache.calls.clear()
    monkeypatch.setattr(xm, "time", FakeClock(0.0, 0.25, 1.0, 1.5))
    with metrics.stage("preprocess"):
        pass
    with pytest.raises(RuntimeError):
        with metrics.stage("explain", "grad_cam"):
            raise RuntimeError
    metrics.request("explain", 422)
    metrics.error("cost_cap_exceeded")
    metrics.explanation("saliency", ok=True, payload_bytes=2048)
    metrics.explanation("saliency", ok=False)
    metrics.quality("saliency", "deletion_auc", 0.42)
    assert cache.updates() == [
        ("xai_stage_latency_seconds", 0.25, ["shapes", "Model", "preprocess", "none"]),
        ("xai_stage_latency_seconds", 0.5, ["shapes", "Model", "explain", "grad_cam"]),
        ("xai_requests_total", 1, ["shapes", "Model", "explain", "client_error"]),
        ("xai_errors_total", 1, ["shapes", "Model", "cost_cap_exceeded"]),
        ("xai_explanations_total", 1, ["shapes", "Model", "saliency", "ok"]),
        ("xai_explanation_bytes", 2048, ["shapes", "Model", "saliency"]),
        ("xai_explanations_total", 1, ["shapes", "Model", "saliency", "error"]),
        ("xai_explanation_quality", 0.42, ["shapes", "Model", "saliency", "deletion_auc"]),
    ]
    assert_declared(cache)
    # label values sit where metrics.yaml declares their names
    for name, _, values in cache.updates():
        named = dict(zip(cache.declared[name][1], values))
        spec = next(s for s in xm.ALL_METRICS if s.name == name)
        assert list(named) == ["ModelName", "Level", *spec.labels]


CLASSES = ["circle", "square", "triangle", "cross"]


def png_bytes(seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def mixed_batch() -> list[RawRequest]:
    image = png_bytes()
    return [
        RawRequest({"body": image}, {}, False),                                           # predict ok
        RawRequest({"body": image}, {}, False),                                           # predict ok
        RawRequest({"body": {"image": base64.b64encode(image).decode(),
                             "explain": ["saliency", "grad_cam"]}}, {}, False),          # explain ok, 2 methods
        RawRequest({"body": b"not an image"}, {}, False),                                 # predict 400 invalid_image
        RawRequest({"body": image}, {"X-Explain": "no_such_method"}, False),              # predict 400 unknown_explainer
        RawRequest({"body": image}, {}, True),                                            # explain ok, 2 defaults
    ]


def service_with(metrics: Metrics) -> ExplanationService:
    section = {"input_size": [16, 16], "class_names": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3,
               "default_explainers": ["guided_backprop", "grad_cam"], "top_k": 2}
    return ExplanationService(seeded(ModuleReluNet(classes=4)), ServingSettings.from_mapping(section), metrics)


def test_service_batch_into_prometheus_registry():
    metrics = prometheus_metrics()
    registry = metrics.recorder.registry
    replies = service_with(metrics).handle(mixed_batch())
    assert [r.status for r in replies] == [200, 200, 200, 400, 400, 200]
    requests = {(route, outcome): sample(registry, "xai_requests_total", route=route, outcome=outcome)
                for route in ("predict", "explain") for outcome in ("ok", "client_error", "server_error")}
    assert requests == {("predict", "ok"): 2, ("predict", "client_error"): 2, ("predict", "server_error"): 0,
                        ("explain", "ok"): 2, ("explain", "client_error"): 0, ("explain", "server_error"): 0}
    assert sample(registry, "xai_errors_total", code="invalid_image") == 1
    assert sample(registry, "xai_errors_total", code="unknown_explainer") == 1
    count = lambda stage, explainer="none": sample(registry, "xai_stage_latency_seconds_count",  # noqa: E731
                                                   stage=stage, explainer=explainer)
    assert count("decode") == 6  # timed also for the two requests that fail in it
    assert count("preprocess") == 4
    assert count("inference") == 3  # one for the two plain requests, one per explained request
    for explainer, n in {"saliency": 1, "grad_cam": 2, "guided_backprop": 1}.items():
        assert count("explain", explainer) == n
        assert sample(registry, "xai_explanations_total", explainer=explainer, outcome="ok") == n
    assert count("encode") == 4


def test_service_batch_through_torchserve_backend_emits_only_declared_metrics():
    cache = FakeMetricsCache()
    replies = service_with(torchserve_metrics(cache)).handle(mixed_batch())
    assert [r.status for r in replies] == [200, 200, 200, 400, 400, 200]
    assert_declared(cache)
    emitted = {(name, tuple(values[2:])) for name, _, values in cache.updates()}
    assert ("xai_stage_latency_seconds", ("explain", "saliency")) in emitted
    assert ("xai_requests_total", ("predict", "client_error")) in emitted
    assert ("xai_errors_total", ("invalid_image",)) in emitted
    assert ("xai_explanation_bytes", ("grad_cam",)) in emitted


METRIC_LINE = re.compile(r"^\[METRICS\](?P<name>[^.:]+)\.(?P<unit>[\w ]+):(?P<value>[^|]+)\|#(?P<dims>[^|]*)"
                         r"\|#type:(?P<type>[A-Z]+)\|#hostname:[^,]+,\d+(,.*)?$")


def test_real_torchserve_metrics_cache_prints_lines_the_frontend_accepts(caplog):
    """Through ts's own MetricsCacheYamlImpl loaded from metrics.yaml: every printed [METRICS] line
    parses, names a declared metric of the declared type, and its dimensions are the yaml's, in order."""
    cache = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    cache.initialize_cache()
    with caplog.at_level(logging.INFO, logger="ts.metrics"):
        replies = service_with(torchserve_metrics(cache)).handle(mixed_batch())
    assert [r.status for r in replies] == [200, 200, 200, 400, 400, 200]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]
    assert not [line for line in lines if "Failed" in line]
    declared = declared_model_metrics()
    seen = set()
    for line in lines:
        m = METRIC_LINE.match(line)
        assert m, line
        kind, dimensions = declared[m["name"]]
        assert m["type"] == kind.name, line
        pairs = [pair.split(":", 1) for pair in m["dims"].split(",")]
        assert [name for name, _ in pairs] == dimensions, line
        assert [value for _, value in pairs][:2] == ["shapes", "Model"], line
        float(m["value"])
        seen.add(m["name"])
    assert seen == {spec.name for spec in xm.ALL_METRICS} - {"xai_explanation_quality"}
