"""A real, throwaway Prometheus server for tests (no pytest dependency, urllib only).

    from tools.prometheus import PrometheusServer

    with PrometheusServer(targets=["127.0.0.1:8082"], rule_files=["deploy/prometheus/alerts.yml"]) as prom:
        prom.wait_for_target_up()
        prom.query('sum(xai_requests_total)')  # -> the API's result list

It listens on a free 127.0.0.1 port, keeps its storage in a private temp dir, runs in its own
process group, and ``stop()`` terminates it (SIGTERM, then SIGKILL) and removes the temp dir.
``targets=None`` scrapes the server itself (handy to prove scraping works).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from tools.processes import stop_process_group


class PrometheusError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_prometheus() -> str | None:
    return shutil.which("prometheus")


class PrometheusServer:
    def __init__(self, targets: list[str] | None = None, job: str = "torchserve",
                 scrape_interval: str = "1s", evaluation_interval: str = "1s",
                 rule_files: list[str] | None = None, binary: str | None = None,
                 start_timeout: float = 30.0):
        self.job = job
        self._targets = targets
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.rule_files = [os.path.abspath(p) for p in (rule_files or [])]
        self.binary = binary or find_prometheus()
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.tmp: str | None = None
        self.port: int | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def targets(self) -> list[str]:
        return list(self._targets) if self._targets is not None else [self.address]

    def config_text(self) -> str:
        # JSON is valid YAML: no YAML library needed, and every string is quoted safely.
        config = {
            "global": {"scrape_interval": self.scrape_interval,
                       "evaluation_interval": self.evaluation_interval},
            "rule_files": self.rule_files,
            "scrape_configs": [{"job_name": self.job, "static_configs": [{"targets": self.targets}]}],
        }
        return json.dumps(config, indent=2)

    def start(self) -> "PrometheusServer":
        if not self.binary:
            raise PrometheusError("prometheus binary not found (apt-get install prometheus)")
        self.tmp = tempfile.mkdtemp(prefix="prometheus-test-")
        self.port = free_port()
        config = os.path.join(self.tmp, "prometheus.yml")
        with open(config, "w") as f:
            f.write(self.config_text())
        self._log = open(os.path.join(self.tmp, "prometheus.log"), "wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={config}",
             f"--storage.tsdb.path={os.path.join(self.tmp, 'data')}",
             f"--web.listen-address={self.address}",
             "--web.enable-lifecycle"],
            cwd=self.tmp, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Waits for /-/ready (also usable on a server started elsewhere: set ``port`` first)."""
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise PrometheusError(f"prometheus at {self.address} not ready in time:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, term_wait=10.0)
            self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- HTTP API --------------------------------------------------------------------------
    def log(self) -> str:
        if not self.tmp:
            return ""
        try:
            with open(os.path.join(self.tmp, "prometheus.log"), "rb") as f:
                return f.read().decode(errors="replace")[-10000:]
        except OSError:
            return ""

    def api(self, path: str, params: dict | None = None, timeout: float = 10.0):
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                body = json.loads(raw)
            except ValueError:
                raise PrometheusError(f"{path}: HTTP {err.code}: {raw[:200]!r}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list:
        """Instant query; returns the ``result`` list (vector: [{"metric": {...}, "value": [t, "v"]}])."""
        return self.api("query", {"query": promql})["result"]

    def scalar(self, promql: str) -> float | None:
        """Value of a one-element vector result, None when the result is empty."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) != 1:
            raise PrometheusError(f"{promql!r} returned {len(result)} series")
        return float(result[0]["value"][1])

    def active_targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def wait_for(self, promql: str, predicate=bool, timeout: float = 30.0, interval: float = 0.25):
        """Polls ``query(promql)`` until ``predicate(result)`` is true; returns the result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise PrometheusError(f"timed out waiting for {promql!r}; last result {result}")
            time.sleep(interval)

    def wait_for_target_up(self, timeout: float = 30.0) -> None:
        self.wait_for(f'up{{job="{self.job}"}} == 1',
                      lambda r: len(r) == len(self.targets), timeout=timeout)

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]
