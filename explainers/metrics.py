"""Every metric the plugin exports, declared once, behind a small recorder interface.

The handler records through TorchServe's context metrics (so one scrape of TorchServe's metrics
address gives everything); code using the explainer layer on its own records into a
``prometheus_client`` registry. Labels stay low-cardinality: stage, explainer, route, outcome and
error code only, never a request id, a class or a user value.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Protocol

STAGES = ("decode", "preprocess", "inference", "explain", "encode")
ROUTES = ("predict", "explain")
OUTCOMES = ("ok", "client_error", "server_error")
NO_EXPLAINER = "none"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "histogram" or "counter"
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

ALL_METRICS = (STAGE_LATENCY, REQUESTS, ERRORS, EXPLANATIONS, EXPLANATION_BYTES, EXPLANATION_QUALITY)


def outcome_of(http_status: int) -> str:
    if http_status < 400:
        return "ok"
    return "client_error" if http_status < 500 else "server_error"


class Recorder(Protocol):
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
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        self._metrics = {}
        for spec in ALL_METRICS:
            if spec.kind == "counter":
                # prometheus_client appends _total itself.
                metric = Counter(spec.name.removesuffix("_total"), spec.help, spec.labels, registry=self.registry)
            else:
                buckets = {"seconds": LATENCY_BUCKETS, "bytes": BYTES_BUCKETS}.get(spec.unit, SCORE_BUCKETS)
                metric = Histogram(spec.name, spec.help, spec.labels, buckets=buckets, registry=self.registry)
            self._metrics[spec.name] = metric

    def observe(self, spec: MetricSpec, value: float, **labels: str) -> None:
        self._metrics[spec.name].labels(**labels).observe(value)

    def increment(self, spec: MetricSpec, amount: float = 1, **labels: str) -> None:
        self._metrics[spec.name].labels(**labels).inc(amount)


def prometheus_metrics(registry=None) -> Metrics:
    """Metrics recorded into a ``prometheus_client`` registry (a fresh one by default).

    Expose it with ``prometheus_client.start_http_server(port, registry=metrics.recorder.registry)``.
    """
    return Metrics(PrometheusRecorder(registry))


# Dimensions TorchServe's frontend puts first on model metrics; our labels follow them.
TORCHSERVE_MODEL_DIMENSIONS = ("ModelName", "Level")


def torchserve_dimensions(spec: MetricSpec) -> list[str]:
    """Dimension names a TorchServe metrics config must declare for ``spec``, in order."""
    return [*TORCHSERVE_MODEL_DIMENSIONS, *spec.labels]


class TorchServeRecorder:
    """Records through the metrics cache TorchServe hands a handler (``context.metrics``).

    The metrics must be declared in the server's metrics config with :func:`torchserve_dimensions`;
    TorchServe's frontend then exports them on its Prometheus endpoint beside its own. Takes the
    cache and TorchServe's metric type enum values from the handler, so this module never imports
    TorchServe.

    Every observation becomes one ``[METRICS]`` line on the worker's stdout, which the frontend
    reads line by line: the line ts's ``CachingMetric.add_or_update`` prints (name, unit, dimension
    names and type from the cached metric), built from parts computed once per label set.

    Cost: ts's own call validates, builds a Dimension object per label and makes one logging call
    (one write to the pipe) per observation, 15-20 % of a small predict request's handler time
    here, and even one logging call per batch costs several % (benchmarks/metrics_overhead.py). So by
    default (``background=True``) an observation is only queued, and a writer thread prints the
    queue every ``flush_interval`` seconds in one logging call, off the request's path. Nothing is
    aggregated or dropped; lines reach the frontend at most ``flush_interval`` later, and a worker
    that dies loses the lines of its last ``flush_interval`` (as it loses the batch it was serving).
    ``flush()`` prints the queue now. With ``background=False`` each observation is printed at once.
    """

    # ts's CachingMetric logs through this logger; the worker sends it to stdout as "%(message)s".
    LOGGER_NAME = "ts.metrics.caching_metric"

    def __init__(self, metrics_cache, model_name: str, counter_type, histogram_type,
                 background: bool = True, flush_interval: float = 0.05):
        self._model_name = model_name
        self._metrics = {
            spec.name: metrics_cache.get_metric(spec.name, counter_type if spec.kind == "counter" else histogram_type)
            for spec in ALL_METRICS
        }
        self._logger = logging.getLogger(self.LOGGER_NAME)
        self._hostname = socket.gethostname()
        self._parts: dict[tuple, tuple[str, str] | None] = {}  # (name, label values) -> line head, tail
        self._queue: collections.deque | None = None
        self._write_lock = threading.Lock()  # one writer at a time: lines leave in the order observed
        if background:
            self._queue = collections.deque()  # append/popleft are thread-safe without a lock
            _start_writer(weakref.ref(self), flush_interval)

    def observe(self, spec: MetricSpec, value: float, **labels: str) -> None:
        observation = (spec, value, labels, time.time())
        if self._queue is not None:
            self._queue.append(observation)
        else:
            with self._write_lock:
                self._write([observation])

    def increment(self, spec: MetricSpec, amount: float = 1, **labels: str) -> None:
        self.observe(spec, amount, **labels)

    def flush(self) -> None:
        """Prints every queued observation now (the writer thread does this every flush_interval)."""
        if self._queue is None:
            return
        with self._write_lock:
            queue, observations = self._queue, []
            for _ in range(len(queue)):
                observations.append(queue.popleft())
            self._write(observations)

    def _write(self, observations: list[tuple]) -> None:
        lines = []
        for spec, value, labels, when in observations:
            key = (spec.name, *map(labels.__getitem__, spec.labels))
            try:
                parts = self._parts[key]
            except KeyError:
                parts = self._parts[key] = self._line_parts(spec, key)
            if parts is None:
                continue
            if value < 0 and spec.kind == "counter":
                self._logger.error("[METRICS]Failed to update metric with name:%s: counter increment %s is negative",
                                   spec.name, value)
                continue
            lines.append(f"{parts[0]}{value}{parts[1]}{int(when)}")
        if lines:
            # One record, one line per observation: the frontend parses stdout line by line.
            self._logger.info("\n".join(lines))

    def _line_parts(self, spec: MetricSpec, key: tuple) -> tuple[str, str] | None:
        """The line around the value for one label set; None (logged once) when the config disagrees."""
        metric = self._metrics[spec.name]
        values = [self._model_name, "Model", *key[1:]]
        names = list(metric.dimension_names)
        if len(values) != len(names):
            # ts's add_or_update refuses such a line too: the frontend could not label it.
            self._logger.error("[METRICS]Failed to update metric with name:%s: dimension values %s should "
                               "correspond to dimension names %s", spec.name, values, names)
            return None
        dimensions = ",".join(f"{name}:{value}" for name, value in zip(names, values))
        return (f"[METRICS]{metric.metric_name}.{metric.unit}:",
                f"|#{dimensions}|#type:{metric.metric_type.name}|#hostname:{self._hostname},")


def _start_writer(recorder_ref, interval: float) -> None:
    """A daemon thread flushing the recorder every ``interval`` seconds while it exists, and at exit."""

    def flush_at_exit():
        recorder = recorder_ref()
        if recorder is not None:
            recorder.flush()

    def loop():
        while not idle.wait(interval):  # never set: a sleep that ignores patches of this module's time
            recorder = recorder_ref()
            if recorder is None:
                return
            try:
                recorder.flush()
            except Exception:  # a metrics failure must never stop the writer
                logging.getLogger(__name__).exception("writing metric lines failed")
            del recorder

    idle = threading.Event()
    atexit.register(flush_at_exit)
    threading.Thread(target=loop, name="xai-metrics-writer", daemon=True).start()
