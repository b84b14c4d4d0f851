"""Monitoring end to end: the demo model in a real TorchServe, scraped by a real Prometheus.

After mixed traffic (plain predictions, explanations with several explainers, bad input),
Prometheus's query API holds our histogram and counters with the exact counts sent, and every
metric name the Grafana dashboard reads is on the live /metrics of that TorchServe (not only in
metrics.yaml). One TorchServe and one Prometheus for the whole module.
"""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from support import prom_text
from tools.prometheus import PrometheusServer
from support.promql_names import grafana_query_names, metric_names
from tools.demo_server import b64, build_store, post_json, running_server, shape_png
from support.paths import REPO_ROOT

pytestmark = [
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs java"),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed"),
]

ROOT = REPO_ROOT
DASHBOARD = ROOT / "deploy" / "grafana" / "xai-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PNG = {"Content-Type": "image/png"}
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped",
                        "scrape_samples_post_metric_relabeling", "scrape_series_added"}
# Declared metrics whose series the frontend creates on a first update that this traffic never
# makes: quality scores are computed only when a request asks for them, and nothing here fails with
# a 5xx. Their family is on the scrape from the start (# TYPE line), which the test checks.
NOT_PRODUCED_BY_THIS_TRAFFIC = {"xai_explanation_quality_sum": "xai_explanation_quality",
                                "xai_explanation_quality_count": "xai_explanation_quality",
                                "Requests5XX": "Requests5XX"}

# The traffic, and what it must add up to: (what, how many, route, HTTP status, error code).
PLAIN = 5                 # /predictions, raw PNG                          -> predict ok
EXPLAINED_BY_FIELD = 3    # /predictions, JSON explain [saliency, grad_cam] -> explain ok
EXPLAINED_BY_ROUTE = 2    # /explanations, defaults guided_backprop, grad_cam -> explain ok
BAD_IMAGE = 3             # /predictions, not an image                      -> predict 400 invalid_image
BAD_ON_EXPLAIN = 1        # /explanations, not an image                     -> explain 400 invalid_image
UNKNOWN_EXPLAINER = 2     # /predictions, X-Explain: lime                   -> predict 400 unknown_explainer
EXPECTED_REQUESTS = {
    ("predict", "ok"): PLAIN, ("explain", "ok"): EXPLAINED_BY_FIELD + EXPLAINED_BY_ROUTE,
    ("predict", "client_error"): BAD_IMAGE + UNKNOWN_EXPLAINER, ("explain", "client_error"): BAD_ON_EXPLAIN,
    ("predict", "server_error"): 0, ("explain", "server_error"): 0,
}
EXPECTED_EXPLAINS = {"saliency": EXPLAINED_BY_FIELD, "grad_cam": EXPLAINED_BY_FIELD + EXPLAINED_BY_ROUTE,
                     "guided_backprop": EXPLAINED_BY_ROUTE}
EXPECTED_ERRORS = {"invalid_image": BAD_IMAGE + BAD_ON_EXPLAIN, "unknown_explainer": UNKNOWN_EXPLAINER}
TOTAL = sum(EXPECTED_REQUESTS.values())


def traffic() -> list[tuple[str, tuple]]:
    jobs = []
    for i in range(PLAIN):
        jobs.append(("plain", ("POST", "/predictions/shapes", shape_png(("circle", "square", "star")[i % 3]), PNG)))
    for _ in range(EXPLAINED_BY_FIELD):
        jobs.append(("json", ("/predictions/shapes", {"image": b64(shape_png("triangle")), "explain": ["saliency", "grad_cam"]})))
    for _ in range(EXPLAINED_BY_ROUTE):
        jobs.append(("plain", ("POST", "/explanations/shapes", shape_png("cross"), PNG)))
    for _ in range(BAD_IMAGE):
        jobs.append(("plain", ("POST", "/predictions/shapes", b"this is not an image", PNG)))
    for _ in range(BAD_ON_EXPLAIN):
        jobs.append(("plain", ("POST", "/explanations/shapes", b"neither is this", PNG)))
    for _ in range(UNKNOWN_EXPLAINER):
        jobs.append(("plain", ("POST", "/predictions/shapes", shape_png("star"), {**PNG, "X-Explain": "lime"})))
    return jobs


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(TorchServe, Prometheus, the replies' statuses) after the traffic, both servers running."""
    store = build_store(tmp_path_factory.mktemp("store"))
    with running_server(store, tmp_path_factory.mktemp("run"), {"shapes": "shapes.mar"}) as server:
        target = server.metrics_url.split("://", 1)[1]
        with PrometheusServer(targets=[target], rule_files=[str(ALERTS)]) as prom:
            prom.wait_for_target_up(timeout=30)

            def send(job):
                kind, args = job
                reply = post_json(server, *args) if kind == "json" else server.request(*args, timeout=120)
                return reply.status

            # concurrent, so TorchServe batches some of them (batchSize 4)
            with ThreadPoolExecutor(4) as pool:
                statuses = list(pool.map(send, traffic()))
            yield server, prom, statuses


def test_replies_are_what_the_traffic_asks_for(stack):
    _, _, statuses = stack
    assert sorted(statuses) == sorted([200] * (PLAIN + EXPLAINED_BY_FIELD + EXPLAINED_BY_ROUTE)
                                      + [400] * (BAD_IMAGE + BAD_ON_EXPLAIN + UNKNOWN_EXPLAINER))


def test_prometheus_holds_request_counts_by_route_and_outcome(stack):
    _, prom, _ = stack
    query = 'sum by (route, outcome) (xai_requests_total{ModelName="shapes",Level="Model"})'
    expected = {key: float(n) for key, n in EXPECTED_REQUESTS.items()}

    def by_labels(result):
        return {(r["metric"]["route"], r["metric"]["outcome"]): float(r["value"][1]) for r in result}

    result = prom.wait_for(query, lambda r: by_labels(r) == expected, timeout=20)
    assert by_labels(result) == expected  # zero-initialised server_error series included
    errors = prom.wait_for('sum by (code) (xai_errors_total{ModelName="shapes"})',
                           lambda r: len(r) == len(EXPECTED_ERRORS), timeout=10)
    assert {r["metric"]["code"]: float(r["value"][1]) for r in errors} == EXPECTED_ERRORS
    # TorchServe's own counter saw the same requests
    frontend = prom.wait_for('sum(ts_inference_requests_total{model_name="shapes"})',
                             lambda r: r and float(r[0]["value"][1]) == TOTAL, timeout=10)
    assert float(frontend[0]["value"][1]) == TOTAL


def test_prometheus_holds_the_explain_stage_histogram_per_explainer(stack):
    _, prom, _ = stack
    counts = prom.wait_for(
        'sum by (explainer) (xai_stage_latency_seconds_count{ModelName="shapes",stage="explain"})',
        lambda r: len(r) == len(EXPECTED_EXPLAINS), timeout=20)
    assert {r["metric"]["explainer"]: float(r["value"][1]) for r in counts} == EXPECTED_EXPLAINS
    buckets = prom.query('xai_stage_latency_seconds_bucket{ModelName="shapes",stage="explain"}')
    by_explainer: dict[str, dict[str, float]] = {}
    for series in buckets:
        labels = series["metric"]
        assert set(labels) == {"__name__", "instance", "job", "ModelName", "Level", "Hostname", "stage",
                               "explainer", "le"}, labels
        by_explainer.setdefault(labels["explainer"], {})[labels["le"]] = float(series["value"][1])
    assert set(by_explainer) == set(EXPECTED_EXPLAINS)
    for explainer, cumulative in by_explainer.items():
        # TorchServe's fixed buckets, cumulative, ending at the count
        les = sorted(cumulative, key=float)
        assert les[0] == "0.005" and les[-1] == "+Inf" and len(les) == 15, les
        values = [cumulative[le] for le in les]
        assert values == sorted(values) and values[-1] == EXPECTED_EXPLAINS[explainer], (explainer, cumulative)
    # every other stage is labelled explainer="none"
    stages = prom.query('sum by (stage, explainer) (xai_stage_latency_seconds_count{ModelName="shapes",stage!="explain"})')
    assert {r["metric"]["stage"] for r in stages} == {"decode", "preprocess", "inference", "encode"}
    assert {r["metric"]["explainer"] for r in stages} == {"none"}
    # a quantile over them comes out as a positive latency within the measurable range
    p99 = prom.query('histogram_quantile(0.99, sum by (le, explainer) '
                     '(xai_stage_latency_seconds_bucket{ModelName="shapes",stage="explain"}))')
    assert {r["metric"]["explainer"] for r in p99} == set(EXPECTED_EXPLAINS)
    assert all(0 < float(r["value"][1]) <= 10 for r in p99), p99


def _dashboard():
    return json.loads(DASHBOARD.read_text())


def _panels(panels):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _concrete(expr: str) -> str:
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "30s", expr)
    return re.sub(r"\$\{?[A-Za-z0-9_]+\}?", ".*", expr)


def test_every_dashboard_metric_is_on_the_live_scrape(stack):
    server, _, _ = stack
    text = server.request("GET", "/metrics", api="metrics").text
    live = set(prom_text.parse(text))
    recorded = {rule["record"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
                for rule in group["rules"] if "record" in rule}
    dashboard = _dashboard()
    wanted: dict[str, set[str]] = {}
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            for name in metric_names(target["expr"]):
                wanted.setdefault(name, set()).add(panel["title"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            for name in grafana_query_names(query):
                wanted.setdefault(name, set()).add(f"${variable['name']}")
    missing = {name: sorted(where) for name, where in wanted.items()
               if name not in live | recorded | PROMETHEUS_SYNTHETIC | set(NOT_PRODUCED_BY_THIS_TRAFFIC)}
    assert not missing, f"dashboard reads metrics this TorchServe does not export: {missing}"
    # the exemptions are exported families, only without a series yet
    families = prom_text.types(text)
    for name, family in NOT_PRODUCED_BY_THIS_TRAFFIC.items():
        assert family in families and name not in live, name


def test_dashboard_panels_have_data_in_prometheus(stack):
    _, prom, _ = stack
    prom.wait_for('sum(xai_requests_total{ModelName="shapes"})',
                  lambda r: r and float(r[0]["value"][1]) == TOTAL, timeout=20)
    # rate() needs two scrapes of each new series (the explain histograms appear with the traffic)
    prom.wait_for('count(count_over_time(xai_stage_latency_seconds_count{ModelName="shapes",stage="explain"}[30s]) >= 2)',
                  lambda r: r and float(r[0]["value"][1]) == len(EXPECTED_EXPLAINS), timeout=20)
    empty = []
    for panel in _panels(_dashboard()["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            if not prom.query(_concrete(expr)) and not metric_names(expr) & set(NOT_PRODUCED_BY_THIS_TRAFFIC):
                empty.append((panel["title"], expr))  # prom.query raises on a PromQL error
    assert not empty, empty
