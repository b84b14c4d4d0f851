"""deploy/monitor.sh starts a real Prometheus with the effective config (target substituted, rule
file absolute), in the foreground, and stops on SIGTERM. It scrapes itself here: TS_METRICS_ADDRESS
points at its own listen address."""

import os
import signal
import subprocess
import tempfile

import pytest

from tools.prometheus import PrometheusServer, find_prometheus, free_port
from support.paths import REPO_ROOT

ROOT = str(REPO_ROOT)
SCRIPT = os.path.join(ROOT, "deploy", "monitor.sh")

pytestmark = pytest.mark.skipif(find_prometheus() is None, reason="prometheus not installed")


def test_monitor_sh_runs_prometheus_on_the_given_addresses():
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        env = dict(os.environ, PROMETHEUS_ADDRESS=f"127.0.0.1:{port}",
                   TS_METRICS_ADDRESS=f"http://127.0.0.1:{port}", PROMETHEUS_DATA=data)
        proc = subprocess.Popen(["bash", SCRIPT], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            client = PrometheusServer(job="torchserve", targets=[f"127.0.0.1:{port}"])
            client.port = port  # a client for a server started elsewhere
            try:
                client.wait_ready(timeout=30)
            except Exception:
                if proc.poll() is not None:
                    pytest.fail(f"monitor.sh exited {proc.returncode}: {proc.stdout.read().decode()}")
                raise
            client.wait_for_target_up(timeout=30)
            with open(os.path.join(data, "prometheus.yml")) as f:
                config = f.read()
            assert f'"127.0.0.1:{port}"' in config and "8082" not in config
            assert f'"{os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")}"' in config
            assert os.path.isdir(os.path.join(data, "data"))
            assert {g["name"] for g in client.api("rules")["groups"]} == {"xai-objectives", "xai-alerts"}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            proc.stdout.close()
        assert proc.returncode == 0  # exec'd prometheus exits 0 on SIGTERM


def test_monitor_sh_rejects_a_bad_target():
    env = dict(os.environ, TS_METRICS_ADDRESS="not an address", PROMETHEUS_DATA=tempfile.gettempdir())
    out = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "TS_METRICS_ADDRESS" in out.stderr
