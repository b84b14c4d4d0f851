"""Every metric the plugin exports, declared once, behind a small recorder interface.

The TorchServe handler records through TorchServe's context metrics
(``handlers/torchserve_metrics.py``: one scrape of TorchServe's metrics address gives everything);
a service used on its own records into a ``prometheus_client`` registry. Labels stay low-cardinality: stage, explainer, route, outcome and
error code only, never a request id, a class or a user value.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Protocol

STAGES = ("decode", "preprocess", "inference", "explain", "encode")
ROUTES = ("predict", "explain")
OUTCOMES = ("ok", "client_error", "server_error")
NO_EXPLAINER = "none"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "histogram", "counter" or "gauge"
    labels: tuple[str, ...]
    unit: str
    help: str


STAGE_LATENCY = MetricSpec("xai_stage_latency_seconds", "histogram", ("stage", "explainer"), "seconds",
                           "Time spent per request in each handler stage, per explainer in the explain stage.")
REQUESTS = MetricSpec("xai_requests_total", "counter", ("route", "outcome"), "requests",
                      "Requests handled, by route (predict, explain) and outcome (ok, client_error, server_error).")
ERRORS = MetricSpec("xai_errors_total", "counter", ("code",), "errors",
                    "Errors by stable error code, explanation failures included.")
EXPLANATIONS = MetricSpec("xai_explanations_total", "counter", ("explainer", "outcome"), "explanations",
                          "Explanations computed, by explainer and outcome.")
EXPLANATION_BYTES = MetricSpec("xai_explanation_bytes", "histogram", ("explainer",), "bytes",
                               "Size of each encoded explanation payload.")
EXPLANATION_QUALITY = MetricSpec("xai_explanation_quality", "histogram", ("explainer", "metric"), "score",
                                 "Quality scores of served explanations, when requested.")

# Set when the model loads: 1 when the explainer passes the check on the served model, 0 when it fails.
EXPLAINER_SANITY = MetricSpec("xai_explainer_sanity", "gauge", ("explainer", "check"), "pass",
                              "Sanity checks of each explainer on the served model (1 pass, 0 fail), by check "
                              "(class_sensitive, randomisation_sensitive).")

ALL_METRICS = (STAGE_LATENCY, REQUESTS, ERRORS, EXPLANATIONS, EXPLANATION_BYTES, EXPLANATION_QUALITY,
               EXPLAINER_SANITY)


def outcome_of(http_status: int) -> str:
    if http_status < 400:
        return "ok"
    return "client_error" if http_status < 500 else "server_error"


class Recorder(Protocol):
    # A gauge's observation is its new value.
    def observe(self, spec: MetricSpec, value: float, **labels: str) -> None: ...

    def increment(self, spec: MetricSpec, amount: float = 1, **labels: str) -> None: ...


class NullRecorder:
    """Records nothing."""

    def observe(self, spec: MetricSpec, value: float, **labels: str) -> None:
        pass

    def increment(self, spec: MetricSpec, amount: float = 1, **labels: str) -> None:
        pass


class Metrics:
    """The plugin's metric vocabulary over any :class:`Recorder`."""

    def __init__(self, recorder: Recorder | None = None):
        self.recorder = recorder or NullRecorder()
        # Every request series exists from the start, so increase() sees the first error too.
        for route in ROUTES:
            for outcome in OUTCOMES:
                self.recorder.increment(REQUESTS, 0, route=route, outcome=outcome)

    def stage(self, stage: str, explainer: str = NO_EXPLAINER) -> contextlib.AbstractContextManager:
        """Times the block into ``xai_stage_latency_seconds`` (also when it raises)."""
        return _StageTimer(self.recorder, stage, explainer)

    def request(self, route: str, http_status: int, count: int = 1) -> None:
        self.recorder.increment(REQUESTS, count, route=route, outcome=outcome_of(http_status))

    def requests(self, replies) -> None:
        """Counts a batch's replies (``route``, ``status`` each): one increment per label set.

        Through TorchServe every increment is a log line the frontend parses; one per batch and
        outcome instead of one per request keeps that cost off the predict path.
        """
        counts: dict[tuple[str, str], int] = {}
        for reply in replies:
            key = (reply.route, outcome_of(reply.status))
            counts[key] = counts.get(key, 0) + 1
        for (route, outcome), count in counts.items():
            self.recorder.increment(REQUESTS, count, route=route, outcome=outcome)

    def error(self, code: str) -> None:
        self.recorder.increment(ERRORS, code=code)

    def explanation(self, explainer: str, ok: bool, payload_bytes: int | None = None) -> None:
        self.recorder.increment(EXPLANATIONS, explainer=explainer, outcome="ok" if ok else "error")
        if payload_bytes is not None:
            self.recorder.observe(EXPLANATION_BYTES, payload_bytes, explainer=explainer)

    def quality(self, explainer: str, metric: str, value: float) -> None:
        self.recorder.observe(EXPLANATION_QUALITY, value, explainer=explainer, metric=metric)

    def sanity(self, values) -> None:
        """Sets ``xai_explainer_sanity`` from ``(explainer, check, 1.0 | 0.0)`` triples."""
        for explainer, check, value in values:
            self.recorder.observe(EXPLAINER_SANITY, value, explainer=explainer, check=check)


class _StageTimer:
    """Metrics.stage's context manager (a class: a few µs cheaper per stage than a generator)."""

    __slots__ = ("recorder", "stage", "explainer", "started")

    def __init__(self, recorder: Recorder, stage: str, explainer: str):
        self.recorder, self.stage, self.explainer = recorder, stage, explainer

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc_info) -> bool:
        self.recorder.observe(STAGE_LATENCY, time.perf_counter() - self.started, stage=self.stage, explainer=self.explainer)
        return False


# Latency buckets from 1 ms to 30 s, as Prometheus expects (seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BYTES_BUCKETS = tuple(float(2 ** k) for k in range(8, 24, 2))  # 256 B to 4 MiB
SCORE_BUCKETS = tuple(k / 10 for k in range(1, 11))


class PrometheusRecorder:
    """Records into a ``prometheus_client`` registry (the explainer layer used outside TorchServe)."""

    def __init__(self, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        self._metrics = {}
        for spec in ALL_METRICS:
            if spec.kind == "counter":
                # prometheus_client appends _total itself.
                metric = Counter(spec.name.removesuffix("_total"), spec.help, spec.labels, registry=self.registry)
            elif spec.kind == "gauge":
                metric = Gauge(spec.name, spec.help, spec.labels, registry=self.registry)
            else:
                buckets = {"seconds": LATENCY_BUCKETS, "bytes": BYTES_BUCKETS}.get(spec.unit, SCORE_BUCKETS)
                metric = Histogram(spec.name, spec.help, spec.labels, buckets=buckets, registry=self.registry)
            self._metrics[spec.name] = metric

    def observe(self, spec: MetricSpec, value: float, **labels: str) -> None:
        metric = self._metrics[spec.name].labels(**labels)
        if spec.kind == "gauge":
            metric.set(value)
        else:
            metric.observe(value)

    def increment(self, spec: MetricSpec, amount: float = 1, **labels: str) -> None:
        self._metrics[spec.name].labels(**labels).inc(amount)


def prometheus_metrics(registry=None) -> Metrics:
    """Metrics recorded into a ``prometheus_client`` registry (a fresh one by default).

    Expose it with ``prometheus_client.start_http_server(port, registry=metrics.recorder.registry)``.
    """
    return Metrics(PrometheusRecorder(registry))
