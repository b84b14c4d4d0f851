"""The plugin's metrics written the way TorchServe's frontend reads them: ``[METRICS]`` log lines."""

from __future__ import annotations

import atexit
import collections
import logging
import socket
import threading
import time
import weakref

from serving.metrics import ALL_METRICS, MetricSpec

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
                 background: bool = True, flush_interval: float = 0.05, gauge_type=None):
        self._model_name = model_name
        types = {"counter": counter_type, "histogram": histogram_type, "gauge": gauge_type}
        # Without a gauge type (an older caller), gauges are not recorded rather than mistyped.
        self._metrics = {spec.name: metrics_cache.get_metric(spec.name, types[spec.kind])
                         for spec in ALL_METRICS if types[spec.kind] is not None}
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
            if spec.name not in self._metrics:
                continue
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
