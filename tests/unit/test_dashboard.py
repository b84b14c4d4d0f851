"""deploy/grafana/xai-dashboard.json: importable structure, and every PromQL expression reads only
metric names that really exist (declared in deploy/torchserve/metrics.yaml, recorded by
deploy/prometheus/alerts.yml, or made by Prometheus itself), with valid PromQL syntax."""

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from support.promql_names import grafana_query_names, metric_names
from support.paths import REPO_ROOT

ROOT = str(REPO_ROOT)
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "xai-dashboard.json")
METRICS = os.path.join(ROOT, "deploy", "torchserve", "metrics.yaml")
ALERTS = os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")
# series Prometheus adds to every scrape target
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped",
                        "scrape_samples_post_metric_relabeling", "scrape_series_added"}


def exported_names():
    """Names as they appear on TorchServe's /metrics (histograms only as _bucket/_sum/_count)."""
    with open(METRICS) as f:
        cfg = yaml.safe_load(f)
    names = set()
    for section in ("ts_metrics", "model_metrics"):
        for mtype, entries in cfg[section].items():
            for entry in entries:
                if mtype == "histogram":
                    names |= {entry["name"] + s for s in ("_bucket", "_sum", "_count")}
                else:
                    names.add(entry["name"])
    return names


def recorded_names():
    with open(ALERTS) as f:
        rules = yaml.safe_load(f)
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def load():
    with open(DASHBOARD) as f:
        return json.load(f)


def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def expressions(dash):
    for p in all_panels(dash["panels"]):
        for t in p.get("targets", []):
            yield p["title"], t["expr"]


def templating_queries(dash):
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            yield v["name"], q["query"] if isinstance(q, dict) else q


# ---- the parser itself ---------------------------------------------------------------------------
@pytest.mark.parametrize("expr,names", [
    ('histogram_quantile(0.99, sum by (le, stage) (rate(a_bucket{stage="explain",x=~"$v"}[$__rate_interval])))', {"a_bucket"}),
    ("sum(rate(a[5m])) by (le) / on (instance) group_left (job) b offset 1h", {"a", "b"}),
    ('label_replace(increase(c[10m]), "M", "$1", "model_name", "(.+)") unless on (M) d > bool 0.5e3', {"c", "d"}),
    ('rate({__name__="e", job="x"}[1h30m]) > on () group_left () rec:objective_seconds', {"e", "rec:objective_seconds"}),
    ("sum without (instance) (f) and ignoring (code) g or vector(1) # comment h", {"f", "g"}),
    ("max by (WorkerName) (WorkerLoadTime{instance=~\"${instance}\"}) * 1000 + [[legacy]]", {"WorkerLoadTime"}),
])
def test_metric_name_parser(expr, names):
    assert metric_names(expr) == names


def test_grafana_query_parser():
    assert grafana_query_names('label_values(m{a=~"$x"}, model_name)') == {"m"}
    assert grafana_query_names("label_values(model_name)") == set()
    assert grafana_query_names("query_result(topk(3, n))") == {"n"}


# ---- the dashboard -------------------------------------------------------------------------------
def test_datasource_is_a_template_variable():
    dash = load()
    ds = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert [(v["name"], v["query"]) for v in ds] == [("DS_PROMETHEUS", "prometheus")]
    for p in all_panels(dash["panels"]):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]
    ids = [p["id"] for p in all_panels(dash["panels"])]
    assert len(ids) == len(set(ids))
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36


def test_every_metric_name_is_really_exported():
    allowed = exported_names() | recorded_names() | PROMETHEUS_SYNTHETIC
    found = set()
    for where, expr in list(expressions(load())) + list(templating_queries(load())):
        names = grafana_query_names(expr) if where in {v["name"] for v in load()["templating"]["list"]} else metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - allowed
        assert not unknown, f"{where}: {sorted(unknown)} not exported (expr {expr!r})"
        found |= names
    # the panels the dashboard promises
    for name in ("xai_requests_total", "xai_stage_latency_seconds_bucket", "xai_errors_total",
                 "ts_queue_latency_microseconds", "ts_inference_requests_total", "CPUUtilization",
                 "MemoryUsed", "WorkerLoadTime"):
        assert name in found, name


def test_latency_quantiles_by_stage_and_by_explainer():
    exprs = [e for _, e in expressions(load())]
    for q in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({q}, sum by (le, stage)" in e for e in exprs), q
        assert any(f"histogram_quantile({q}, sum by (le, explainer)" in e and 'stage="explain"' in e for e in exprs), q
    assert any("sum by (route, outcome)" in e and "xai_requests_total" in e for e in exprs)
    assert any("sum by (code)" in e and "xai_errors_total" in e for e in exprs)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_every_expression_is_valid_promql(tmp_path):
    def concrete(expr):
        # Grafana variables -> values Prometheus would see
        expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "5m", expr)
        return re.sub(r"\$\{?[A-Za-z0-9_]+\}?", ".*", expr)

    exprs = [concrete(e) for _, e in expressions(load())]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
