"""deploy/prometheus: promtool accepts the scrape config and the alert rules, and the rule unit
tests (alerts_test.yml: each alert firing and not firing) pass."""

import os
import shutil
import subprocess

import pytest
from support.paths import REPO_ROOT

ROOT = str(REPO_ROOT)
PROM = os.path.join(ROOT, "deploy", "prometheus")

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed: apt-get install prometheus (deploy/install-system-deps.sh, run by CI, does it)")


def promtool(*args):
    out = subprocess.run(["promtool", *args], cwd=PROM, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_check_rules():
    assert "SUCCESS" in promtool("check", "rules", "alerts.yml")


def test_check_config():
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")


def test_rule_unit_tests():
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_every_alert_has_a_unit_test_and_severity():
    import yaml

    with open(os.path.join(PROM, "alerts.yml")) as f:
        rules = yaml.safe_load(f)
    with open(os.path.join(PROM, "alerts_test.yml")) as f:
        tests = yaml.safe_load(f)
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tested = {}
    for t in tests["tests"]:
        for case in t.get("alert_rule_test", []):
            tested.setdefault(case["alertname"], set()).add(bool(case["exp_alerts"]))
    for name, rule in alerts.items():
        assert tested.get(name) == {True, False}, f"{name}: needs a firing and a not-firing case"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name
