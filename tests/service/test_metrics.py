"""serving.metrics: the vocabulary records the right names, labels and values, into a
prometheus_client registry and through TorchServe's metrics cache, and the TorchServe backend emits
exactly what deploy/torchserve/metrics.yaml declares (names, types, label arity and order)."""

from __future__ import annotations

import base64
import io
import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from prometheus_client import CollectorRegistry
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.metrics.metric_type_enum import MetricTypes

from serving import metrics as xm
from serving.metrics import Metrics, NullRecorder, PrometheusRecorder, prometheus_metrics
from handlers.torchserve_metrics import TorchServeRecorder
from serving.requests import RawRequest
from serving.service import ExplanationService
from serving.settings import ServingSettings
from support.models import ModuleReluNet, seeded
from support.paths import REPO_ROOT

METRICS_YAML = REPO_ROOT / "deploy" / "torchserve" / "metrics.yaml"
TYPES = {"counter": MetricTypes.COUNTER, "gauge": MetricTypes.GAUGE, "histogram": MetricTypes.HISTOGRAM}


class FakeClock:
    """Stands in for the ``time`` module of serving.metrics: perf_counter() returns set values."""

    def __init__(self, *readings: float):
        self.readings = list(readings)

    def perf_counter(self) -> float:
        return self.readings.pop(0)

    def time(self) -> float:  # the wall-clock stamp on TorchServe's metric lines
        return 1_700_000_000.0


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


METRIC_LINE = re.compile(r"^\[METRICS\](?P<name>[^.:]+)\.(?P<unit>[\w ]+):(?P<value>[0-9\-,.e]+)\|#(?P<dims>[^|]*)"
                         r"\|#type:(?P<type>[A-Z]+)\|#hostname:[^,]+,\d+(,.*)?$")  # the frontend's pattern, stricter


def parse_line(line: str) -> tuple[str, float, list[tuple[str, str]], str]:
    """(name, value, [(dimension name, value)...], TYPE) of one [METRICS] line."""
    m = METRIC_LINE.match(line)
    assert m, f"the frontend cannot parse {line!r}"
    return m["name"], float(m["value"]), [tuple(pair.split(":", 1)) for pair in m["dims"].split(",")], m["type"]


class PrintedLines(logging.Handler):
    """Collects the lines printed through ts's metrics logger (one record may hold several lines)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.records = 0

    def emit(self, record):
        self.records += 1
        self.lines.extend(record.getMessage().split("\n"))

    def metric_lines(self) -> list[str]:
        return [line for line in self.lines if line.startswith("[METRICS]") and not line.startswith("[METRICS]Failed")]


@pytest.fixture
def printed():
    capture = PrintedLines()
    logger = logging.getLogger(TorchServeRecorder.LOGGER_NAME)
    level = logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    yield capture
    logger.removeHandler(capture)
    logger.setLevel(level)


class FakeMetric:
    """What the recorder reads from a ts CachingMetric: name, unit, dimension names, type."""

    def __init__(self, name: str, unit: str, dimension_names: list[str], metric_type: MetricTypes):
        self.metric_name, self.unit, self.dimension_names, self.metric_type = name, unit, dimension_names, metric_type


class FakeMetricsCache:
    """A stand-in for context.metrics that only knows what metrics.yaml declares, and records calls."""

    def __init__(self):
        self.declared = declared_model_metrics()
        self.calls: list[tuple] = []

    def get_metric(self, name, metric_type=MetricTypes.COUNTER):
        self.calls.append(("get_metric", name, metric_type))
        if name not in self.declared or self.declared[name][0] != metric_type:
            raise KeyError(f"{metric_type}:{name} is not declared in metrics.yaml")  # as MetricsCacheKeyError
        return FakeMetric(name, "unit", list(self.declared[name][1]), metric_type)

    # TorchServe's convenience calls put ModelName/Level last: the recorder must never use them.
    def add_metric(self, *args, **kwargs):
        raise AssertionError("add_metric mislabels metrics declared with ModelName, Level first")

    add_time = add_counter = add_size = add_percent = add_metric


def torchserve_metrics(cache, model_name="shapes", background=False) -> Metrics:
    return Metrics(TorchServeRecorder(cache, model_name, MetricTypes.COUNTER, MetricTypes.HISTOGRAM,
                                      background=background, gauge_type=MetricTypes.GAUGE))


def updates(printed: PrintedLines) -> list[tuple[str, float, list[str]]]:
    """(name, value, dimension values) of every metric line printed, checked against metrics.yaml:
    a declared metric of the declared type, one value per declared dimension, in the declared order."""
    declared = declared_model_metrics()
    out = []
    for line in printed.metric_lines():
        name, value, dimensions, kind = parse_line(line)
        assert name in declared, f"{name} is not declared in metrics.yaml (the frontend drops it)"
        assert kind == declared[name][0].name, line
        assert [n for n, _ in dimensions] == declared[name][1], (line, declared[name][1])
        values = [v for _, v in dimensions]
        assert values[:2] == ["shapes", "Model"], line
        for value_ in values:
            assert value_ and not re.search(r"[,:|]", value_), line
        assert value >= 0, line
        out.append((name, value, values))
    assert not [line for line in printed.lines if "Failed" in line], printed.lines
    return out


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


def test_recorder_emits_model_name_level_then_our_labels(monkeypatch, printed):
    cache = FakeMetricsCache()
    metrics = torchserve_metrics(cache)
    assert updates(printed) == [("xai_requests_total", 0, ["shapes", "Model", route, outcome])
                                for route in ("predict", "explain") for outcome in ("ok", "client_error", "server_error")]
    printed.lines.clear()
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
    assert updates(printed) == [
        ("xai_stage_latency_seconds", 0.25, ["shapes", "Model", "preprocess", "none"]),
        ("xai_stage_latency_seconds", 0.5, ["shapes", "Model", "explain", "grad_cam"]),
        ("xai_requests_total", 1, ["shapes", "Model", "explain", "client_error"]),
        ("xai_errors_total", 1, ["shapes", "Model", "cost_cap_exceeded"]),
        ("xai_explanations_total", 1, ["shapes", "Model", "saliency", "ok"]),
        ("xai_explanation_bytes", 2048, ["shapes", "Model", "saliency"]),
        ("xai_explanations_total", 1, ["shapes", "Model", "saliency", "error"]),
        ("xai_explanation_quality", 0.42, ["shapes", "Model", "saliency", "deletion_auc"]),
    ]
    # label values sit where metrics.yaml declares their names
    for line in printed.metric_lines():
        name, _, dimensions, _ = parse_line(line)
        spec = next(s for s in xm.ALL_METRICS if s.name == name)
        assert [n for n, _ in dimensions] == ["ModelName", "Level", *spec.labels]


def test_recorder_drops_what_the_frontend_would_refuse(printed):
    cache = FakeMetricsCache()
    cache.declared["xai_errors_total"] = (MetricTypes.COUNTER, ["ModelName", "Level"])  # one dimension short
    metrics = torchserve_metrics(cache)
    printed.lines.clear()
    metrics.error("internal")
    metrics.error("internal")
    metrics.recorder.increment(xm.REQUESTS, -1, route="predict", outcome="ok")
    assert printed.metric_lines() == []
    failures = [line for line in printed.lines if "Failed to update metric" in line]
    assert len(failures) == 2  # the bad label set is reported once, the negative increment once


def test_background_recorder_prints_the_same_lines_later_in_one_call(monkeypatch, printed):
    monkeypatch.setattr(xm, "time", FakeClock(*[float(t) for t in range(16)]))
    background = Metrics(TorchServeRecorder(FakeMetricsCache(), "shapes", MetricTypes.COUNTER, MetricTypes.HISTOGRAM,
                                            flush_interval=3600))  # only flush() prints here
    background.recorder.flush()  # the zero-initialised series
    printed.lines.clear()
    records = printed.records
    for stage in ("decode", "preprocess", "inference"):
        with background.stage(stage):
            pass
    background.request("predict", 200)
    background.request("predict", 400)
    queued = printed.metric_lines()
    background.recorder.flush()
    lines = printed.metric_lines()
    assert queued == [] and printed.records - records == 1
    assert [(name, value, values[2:]) for name, value, values in updates(printed)] == [
        ("xai_stage_latency_seconds", 1.0, ["decode", "none"]),
        ("xai_stage_latency_seconds", 1.0, ["preprocess", "none"]),
        ("xai_stage_latency_seconds", 1.0, ["inference", "none"]),
        ("xai_requests_total", 1, ["predict", "ok"]),
        ("xai_requests_total", 1, ["predict", "client_error"]),
    ]


def test_background_writer_prints_on_its_own(printed):
    metrics = Metrics(TorchServeRecorder(FakeMetricsCache(), "shapes", MetricTypes.COUNTER, MetricTypes.HISTOGRAM,
                                         flush_interval=0.01))
    metrics.error("invalid_image")
    deadline = time.monotonic() + 5
    while not any("xai_errors_total" in line for line in printed.metric_lines()):
        assert time.monotonic() < deadline, "the writer thread printed nothing"
        time.sleep(0.01)
    assert len(updates(printed)) == 7  # six zero-initialised request series, one error


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


def test_service_batch_through_torchserve_backend_emits_only_declared_metrics(printed):
    metrics = torchserve_metrics(FakeMetricsCache(), background=True)
    replies = service_with(metrics).handle(mixed_batch())
    assert [r.status for r in replies] == [200, 200, 200, 400, 400, 200]
    metrics.sanity([("grad_cam", "class_sensitive", 1.0), ("guided_backprop", "class_sensitive", 0.0)])
    metrics.recorder.flush()
    emitted = {(name, tuple(values[2:])) for name, _, values in updates(printed)}
    assert ("xai_stage_latency_seconds", ("explain", "saliency")) in emitted
    assert ("xai_requests_total", ("predict", "client_error")) in emitted
    assert ("xai_errors_total", ("invalid_image",)) in emitted
    assert ("xai_explanation_bytes", ("grad_cam",)) in emitted


def real_cache() -> MetricsCacheYamlImpl:
    cache = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    cache.initialize_cache()
    return cache


def test_real_torchserve_metrics_cache_lines_are_the_frontend_s(printed):
    """Through ts's own MetricsCacheYamlImpl loaded from metrics.yaml, the whole service: every
    printed line parses, names a declared metric of its declared type, with the yaml's dimensions."""
    metrics = torchserve_metrics(real_cache(), background=True)
    replies = service_with(metrics).handle(mixed_batch())
    assert [r.status for r in replies] == [200, 200, 200, 400, 400, 200]
    metrics.sanity([("grad_cam", "class_sensitive", 1.0), ("guided_backprop", "class_sensitive", 0.0)])
    metrics.recorder.flush()
    seen = {name for name, _, _ in updates(printed)}
    assert seen == {spec.name for spec in xm.ALL_METRICS} - {"xai_explanation_quality"}


def test_lines_equal_what_ts_add_or_update_prints(printed):
    """Our cheaper formatting prints exactly ts's own line (up to the time stamp) for every metric."""
    cache = real_cache()
    recorder = TorchServeRecorder(cache, "shapes", MetricTypes.COUNTER, MetricTypes.HISTOGRAM, background=False,
                                  gauge_type=MetricTypes.GAUGE)
    observations = [(xm.EXPLAINER_SANITY, 0.0, {"explainer": "guided_backprop", "check": "class_sensitive"}),
                    (xm.STAGE_LATENCY, 0.0123, {"stage": "explain", "explainer": "grad_cam"}),
                    (xm.STAGE_LATENCY, 2.5e-05, {"stage": "decode", "explainer": "none"}),
                    (xm.REQUESTS, 1, {"route": "predict", "outcome": "ok"}),
                    (xm.ERRORS, 1, {"code": "invalid_image"}),
                    (xm.EXPLANATIONS, 1, {"explainer": "saliency", "outcome": "error"}),
                    (xm.EXPLANATION_BYTES, 4096, {"explainer": "saliency"}),
                    (xm.EXPLANATION_QUALITY, 0.42, {"explainer": "saliency", "metric": "deletion_auc"})]
    ours, theirs = [], []
    for spec, value, labels in observations:
        printed.lines.clear()
        recorder.observe(spec, value, **labels)
        ours += printed.lines
        printed.lines.clear()
        metric = cache.get_metric(spec.name, TYPES[spec.kind])
        metric.add_or_update(value, ["shapes", "Model", *(labels[n] for n in spec.labels)])
        theirs += printed.lines
    stamp = re.compile(r",\d+$")
    assert [stamp.sub("", line) for line in ours] == [stamp.sub("", line) for line in theirs]
    assert len(ours) == len(observations)
