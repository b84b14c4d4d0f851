"""Starts a real TorchServe 0.12 with deploy/torchserve/metrics.yaml and checks, on /metrics, the
facts deploy/torchserve/METRICS_NOTES.md relies on: exported names and label names, the fixed
histogram buckets, the recommended emission calls, and that undeclared metrics are dropped."""

import json
import os
import shutil
import sys
import time

import pytest

from support.paths import REPO_ROOT

ROOT = str(REPO_ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures", "metrics_probe"))
import probe_server  # noqa: E402
from support import prom_text  # noqa: E402
from probe_server import ProbeServer  # noqa: E402

CONFIG = os.path.join(ROOT, "deploy", "torchserve", "metrics.yaml")
BUCKETS = ["0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.25", "0.5", "0.75", "1.0", "2.5",
           "5.0", "7.5", "10.0", "+Inf"]

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs java")


def _get(name, type_, values):
    return {"call": "get_metric", "name": name, "type": type_, "value": None, "dims": values}


def _samples(text):
    return prom_text.parse(text)


def _hits(samples, name, labels):
    return [(lab, v) for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]


def _one(samples, name, **labels):
    hits = _hits(samples, name, labels)
    assert len(hits) == 1, (name, labels, samples.get(name))
    return hits[0]


def _has_value(samples, name, labels, value):
    return any(v == value for _, v in _hits(samples, name, labels))


def _wait_for(ts, names, series=(), timeout=60.0):
    # The frontend parses the worker's metric lines after answering, in its own time: wait for the
    # names and for each (series, value), so a busy machine cannot make the scrape early. On a
    # timeout the samples come back as they are and the tests' own assertions say what is missing.
    deadline = time.monotonic() + timeout
    while True:
        samples = _samples(ts.metrics_text())
        ready = all(n in samples for n in names) and all(_has_value(samples, *s) for s in series)
        if ready or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server():
    with ProbeServer(CONFIG, pythonpath=ROOT) as ts:
        pgid = ts.proc.pid
        yield ts
    assert not probe_server._group_members(pgid), "TorchServe processes left behind"


@pytest.fixture(scope="module")
def scraped(server):
    before = _samples(server.metrics_text())
    m = "probe"
    ops = []
    # label values in the yaml's order: ModelName, Level, then ours
    for v in (0.003, 0.02, 3.0, 20.0):
        op = _get("xai_stage_latency_seconds", "histogram", [m, "Model", "decode", "none"])
        op["value"] = v
        ops.append(op)
    for name, type_, values, v in [
        ("xai_stage_latency_seconds", "histogram", [m, "Model", "explain", "grad_cam"], 0.4),
        ("xai_requests_total", "counter", [m, "Model", "explain", "ok"], 1),
        ("xai_requests_total", "counter", [m, "Model", "explain", "ok"], 1),
        ("xai_errors_total", "counter", [m, "Model", "invalid_image"], 1),
        ("xai_explanations_total", "counter", [m, "Model", "grad_cam", "ok"], 1),
        ("xai_explanation_bytes", "histogram", [m, "Model", "grad_cam"], 12345),
        ("xai_explanation_quality", "histogram", [m, "Model", "grad_cam", "deletion_auc"], 0.3),
    ]:
        op = _get(name, type_, values)
        op["value"] = v
        ops.append(op)
    # ts's add_metric appends ModelName and Level AFTER the given dimensions (the pitfall)
    ops.append({"call": "add_metric", "name": "xai_stage_latency_seconds", "type": "histogram",
                "value": 0.05, "unit": "s", "dims": {"stage": "preprocess", "explainer": "none"}})
    ops.append({"call": "add_metric", "name": "xai_not_declared_total", "type": "counter",
                "value": 1, "unit": "Count", "dims": {"x": "y"}})
    # the project's TorchServeRecorder, as the real handler uses it
    ops.append({"call": "recorder"})
    status, body = server.predict(ops)
    assert status == 200, body
    # the worker imported the checkout under test, not another copy of the package
    assert json.loads(body)["explainers"].startswith(os.path.join(ROOT, "explainers")), body
    # Every series a test below reads, with the value it must reach. The frontend reads the worker's
    # lines in order, but on a slow machine it can lag behind the reply for many seconds; waiting for
    # each asserted value (not just the last line's series) leaves no scrape that is merely early.
    return before, _wait_for(server, ["ts_inference_latency_microseconds", "ts_queue_latency_microseconds"],
                             series=[("xai_requests_total", {"route": "explain", "outcome": "ok"}, 3),
                                     ("xai_requests_total", {"route": "predict", "outcome": "server_error"}, 1),
                                     ("xai_errors_total", {"code": "invalid_image"}, 2),
                                     ("xai_explanations_total", {"explainer": "saliency"}, 1),
                                     ("xai_explanations_total", {"explainer": "grad_cam"}, 1),
                                     ("xai_explanation_bytes_sum", {"explainer": "saliency"}, 2048),
                                     ("xai_explanation_bytes_sum", {"explainer": "grad_cam"}, 12345),
                                     ("xai_explanation_quality_count", {"explainer": "grad_cam"}, 1),
                                     ("xai_explanation_quality_count", {"explainer": "saliency"}, 1),
                                     ("xai_stage_latency_seconds_count", {"stage": "decode"}, 4),
                                     ("xai_stage_latency_seconds_count", {"stage": "explain"}, 1),
                                     ("xai_stage_latency_seconds_count", {"stage": "encode"}, 1),
                                     ("xai_stage_latency_seconds_count", {"ModelName": "preprocess"}, 1)])


def test_counter_created_at_zero_in_initialize(scraped):
    before, _ = scraped
    labels, value = _one(before, "xai_requests_total", route="predict", outcome="server_error")
    assert value == 0.0
    assert labels == {"route": "predict", "outcome": "server_error", "ModelName": "probe",
                      "Level": "Model", "Hostname": labels["Hostname"]}


def test_histogram_names_labels_and_fixed_buckets(scraped):
    _, after = scraped
    buckets = [(lab, v) for lab, v in after["xai_stage_latency_seconds_bucket"] if lab["stage"] == "decode"]
    assert [lab["le"] for lab, _ in buckets] == BUCKETS
    assert set(buckets[0][0]) == {"stage", "explainer", "ModelName", "Level", "Hostname", "le"}
    # observations 0.003, 0.02, 3, 20 -> cumulative counts
    counts = dict((lab["le"], v) for lab, v in buckets)
    assert (counts["0.005"], counts["0.01"], counts["0.025"], counts["2.5"], counts["5.0"],
            counts["10.0"], counts["+Inf"]) == (1, 1, 2, 2, 3, 3, 4)
    _, total = _one(after, "xai_stage_latency_seconds_count", stage="decode")
    _, s = _one(after, "xai_stage_latency_seconds_sum", stage="decode")
    assert total == 4 and s == pytest.approx(23.023)
    labels, _ = _one(after, "xai_stage_latency_seconds_count", stage="explain")
    assert labels["explainer"] == "grad_cam" and labels["ModelName"] == "probe" and labels["Level"] == "Model"


def test_ts_add_metric_mislabels_these_metrics(scraped):
    # The pitfall METRICS_NOTES.md warns about: values are taken by position, add_metric puts
    # ModelName and Level last, our yaml declares them first.
    _, after = scraped
    labels, _ = _one(after, "xai_stage_latency_seconds_count", ModelName="preprocess")
    assert (labels["Level"], labels["stage"], labels["explainer"]) == ("none", "probe", "Model")


def test_project_recorder_emits_correct_labels(scraped):
    _, after = scraped
    _, v = _one(after, "xai_requests_total", route="explain", outcome="ok", ModelName="probe", Level="Model")
    assert v == 3  # 2 from get_metric + 1 from the recorder
    _, v = _one(after, "xai_requests_total", route="predict", outcome="server_error", ModelName="probe")
    assert v == 1
    _, v = _one(after, "xai_errors_total", code="invalid_image", ModelName="probe", Level="Model")
    assert v == 2
    _, v = _one(after, "xai_explanations_total", explainer="saliency", outcome="ok", ModelName="probe")
    assert v == 1
    _, v = _one(after, "xai_explanation_bytes_sum", explainer="saliency", ModelName="probe")
    assert v == 2048
    _, v = _one(after, "xai_explanation_quality_sum", explainer="saliency", metric="deletion_auc")
    assert v == pytest.approx(0.42)
    labels, v = _one(after, "xai_stage_latency_seconds_count", stage="encode")
    assert v == 1 and labels["explainer"] == "none" and labels["ModelName"] == "probe"


def test_counters_and_other_metrics_exported_as_declared(scraped):
    _, after = scraped
    labels, value = _one(after, "xai_requests_total", route="explain", outcome="ok")
    assert value == 3 and set(labels) == {"route", "outcome", "ModelName", "Level", "Hostname"}
    labels, value = _one(after, "xai_errors_total", code="invalid_image")
    assert value == 2 and set(labels) == {"code", "ModelName", "Level", "Hostname"}
    labels, value = _one(after, "xai_explanations_total", explainer="grad_cam", outcome="ok")
    assert value == 1
    _, value = _one(after, "xai_explanation_bytes_sum", explainer="grad_cam")
    assert value == 12345
    _, value = _one(after, "xai_explanation_bytes_bucket", explainer="grad_cam", le="10.0")
    assert value == 0  # bytes never fit the fixed buckets: only _sum/_count are meaningful
    labels, value = _one(after, "xai_explanation_quality_count", explainer="grad_cam", metric="deletion_auc")
    assert value == 1


def test_undeclared_metric_dropped(scraped):
    _, after = scraped
    assert not [n for n in after if "not_declared" in n]


def test_torchserve_builtin_metrics_still_exported(scraped, server):
    _, after = scraped
    for name in ("ts_inference_requests_total", "ts_inference_latency_microseconds",
                 "ts_queue_latency_microseconds"):
        labels, value = _one(after, name, model_name="probe")
        assert set(labels) == {"model_name", "model_version", "hostname"} and value > 0
    for name in ("Requests2XX", "CPUUtilization", "MemoryUsed", "MemoryUtilization", "DiskUsage"):
        labels, _ = after[name][0]
        assert labels["Level"] == "Host" and set(labels) == {"Level", "Hostname"}, (name, labels)
    labels, _ = after["WorkerLoadTime"][0]
    assert labels["WorkerName"].startswith("W-") and labels["WorkerName"].endswith("-probe_1.0")
    assert "PredictionTime" in after


def test_every_declared_metric_has_its_declared_type(server):
    import yaml

    with open(CONFIG) as f:
        cfg = yaml.safe_load(f)
    exported = prom_text.types(server.metrics_text())
    for section in ("ts_metrics", "model_metrics"):
        for mtype, entries in cfg[section].items():
            for entry in entries:
                assert exported.get(entry["name"]) == mtype, (entry["name"], exported.get(entry["name"]))


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")
def test_prometheus_scrapes_torchserve_and_dashboard_queries_run(server, scraped):
    """A real Prometheus scraping the real TorchServe: the text format, names and labels are
    accepted, the dashboard's queries run, and a p99 over TorchServe's buckets comes out right."""
    import json
    import re

    from tools.prometheus import PrometheusServer

    address = server.metrics.split("://", 1)[1]
    alerts = os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")
    with PrometheusServer(targets=[address], rule_files=[alerts]) as prom:
        prom.wait_for_target_up(timeout=30)
        # new explain observations while Prometheus scrapes: 0.4 s lies in the (0.25, 0.5] bucket
        op = _get("xai_stage_latency_seconds", "histogram", ["probe", "Model", "explain", "grad_cam"])
        op["value"] = 0.4
        for _ in range(3):
            assert server.predict([op] * 5)[0] == 200
            time.sleep(1.1)
        p99 = 'histogram_quantile(0.99, sum by (le, explainer) (rate(xai_stage_latency_seconds_bucket{stage="explain"}[30s])))'
        result = prom.wait_for(f"{p99} > 0", timeout=30)
        assert result[0]["metric"] == {"explainer": "grad_cam"}
        assert 0.25 < float(result[0]["value"][1]) <= 0.5
        assert prom.query('xai_requests_total{route="predict",outcome="server_error"}')[0]["metric"]["instance"] == address

        with open(os.path.join(ROOT, "deploy", "grafana", "xai-dashboard.json")) as f:
            dash = json.load(f)
        with_data = set()
        for panel in dash["panels"]:
            for t in panel.get("targets", []):
                expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "30s", t["expr"])
                expr = re.sub(r"\$\{?[A-Za-z0-9_]+\}?", ".*", expr)
                if prom.query(expr):  # raises on any PromQL error
                    with_data.add(panel["title"])
        # no data is fine only where this probe emits nothing (no errors recorded, no BaseHandler...)
        for must in ("Handler request rate by route and outcome", "Explain latency p50 / p95 / p99 by explainer",
                     "TorchServe frontend: requests and HTTP status", "Queue latency (mean per request)",
                     "CPU and memory utilisation (host)", "Memory (host)",
                     "Worker model load time (a new value = a restart)"):
            assert must in with_data, (must, sorted(with_data))


def test_worker_restart_shows_as_a_new_workerloadtime_value(server):
    """Runs last (it kills the worker): the restart alerts rely on WorkerLoadTime being set again,
    under the same WorkerName, when TorchServe restarts a dead worker."""
    def load_times():
        return {lab["WorkerName"]: v for lab, v in _samples(server.metrics_text()).get("WorkerLoadTime", [])}

    before = load_times()
    pid_before = server.worker_pids()
    status, body = server.predict([{"call": "exit"}])
    assert status == 500 and b"Worker died" in body
    deadline = time.monotonic() + 90
    while load_times() == before:
        assert time.monotonic() < deadline, "WorkerLoadTime did not change after the worker died"
        time.sleep(0.5)
    after = load_times()
    assert set(after) == set(before)  # same WorkerName
    assert server.worker_pids() != pid_before
    requests_5xx = _samples(server.metrics_text())["Requests5XX"][0][1]
    assert requests_5xx >= 1
