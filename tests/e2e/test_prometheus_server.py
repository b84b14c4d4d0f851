"""The reusable Prometheus test server (tools/prometheus.py) starts, scrapes, answers
queries, loads our rule file, and leaves no process or temp dir behind."""

import os

import pytest

from tools.prometheus import PrometheusError, PrometheusServer, find_prometheus
from support.paths import REPO_ROOT

ROOT = str(REPO_ROOT)
ALERTS = os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")

pytestmark = pytest.mark.skipif(
    find_prometheus() is None,
    reason="prometheus not installed (apt-get install prometheus; deploy/install-system-deps.sh does it)")


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # still there: only acceptable as a zombie
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_starts_scrapes_itself_queries_and_stops_cleanly():
    prom = PrometheusServer(job="self", rule_files=[ALERTS])
    prom.start()
    pid, tmp = prom.proc.pid, prom.tmp
    try:
        assert prom.address.startswith("127.0.0.1:")
        prom.wait_for_target_up(timeout=30)
        assert prom.scalar('up{job="self"}') == 1.0
        build = prom.query("prometheus_build_info")
        assert build and build[0]["metric"]["job"] == "self"
        # the scraped samples are queryable through functions too
        prom.wait_for('rate(prometheus_http_requests_total{job="self"}[5s]) > 0', timeout=30)
        # our rule file is loaded by a real server (both groups) and its objectives are recorded
        groups = {g["name"] for g in prom.api("rules")["groups"]}
        assert groups == {"xai-objectives", "xai-alerts"}
        prom.wait_for("xai:explain_latency_p99_objective_seconds", timeout=30)
        with pytest.raises(PrometheusError):
            prom.query("sum(")
    finally:
        prom.stop()
    assert prom.proc is None and _gone(pid)
    assert not os.path.exists(tmp)
