"""A real haproxy in front of TorchServe replicas, for tests: health checks on /ping, retries with
redispatch, and requests buffered whole so that a retry can send the body again.

    with HaproxyServer(["127.0.0.1:8080", "127.0.0.1:9080"]) as balancer:
        http_request(balancer.url + "/predictions/shapes", "POST", body, headers)

Listens on a free loopback port, keeps its config in a private temp dir, runs in its own process
group and is stopped by pid (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

from tools.ports import free_port
from tools.processes import stop_process_group


def find_haproxy() -> str | None:
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.path.exists(p)), None)


class HaproxyServer:
    def __init__(self, servers: list[str], *, check_interval_ms: int = 500, retries: int = 3) -> None:
        self.servers = list(servers)
        self.check_interval_ms = check_interval_ms
        self.retries = retries
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.tmp: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        servers = "\n".join(f"    server r{index} {address} check" for index, address in enumerate(self.servers))
        return f"""global
    maxconn 512
    # A retry resends the request from haproxy's buffer: the whole request must fit in it.
    tune.bufsize 262144

defaults
    mode http
    timeout connect 2s
    timeout client 120s
    # TorchServe's responseTimeout for the model is 120 s.
    timeout server 130s
    timeout http-request 10s
    # Predictions and explanations are pure functions of the request: resending is safe.
    retries {self.retries}
    option redispatch 1
    retry-on all-retryable-errors
    # Read the whole body before choosing a server, so it is still there for a retry.
    option http-buffer-request

frontend inference
    bind 127.0.0.1:{self.port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /ping
    http-check expect status 200
    default-server inter {self.check_interval_ms}ms fastinter {self.check_interval_ms}ms fall 2 rise 2
    # Which replica answered (the test counts them).
    http-response set-header X-Served-By %s
{servers}
"""

    def start(self) -> HaproxyServer:
        binary = find_haproxy()
        if binary is None:
            raise RuntimeError("haproxy not installed (bash deploy/install-system-deps.sh haproxy)")
        self.tmp = tempfile.mkdtemp(prefix="haproxy-test-")
        self.port = free_port()
        config = os.path.join(self.tmp, "haproxy.cfg")
        with open(config, "w") as handle:
            handle.write(self.config_text())
        checked = subprocess.run([binary, "-c", "-f", config], capture_output=True, text=True)
        if checked.returncode != 0:
            raise RuntimeError(f"haproxy refused its config:\n{checked.stdout}{checked.stderr}")
        self._log = open(os.path.join(self.tmp, "haproxy.log"), "wb")
        self.proc = subprocess.Popen([binary, "-db", "-f", config], stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited ({self.proc.returncode}): {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"haproxy not listening: {self.log()}")

    def log(self) -> str:
        try:
            with open(os.path.join(self.tmp, "haproxy.log"), "rb") as handle:
                return handle.read().decode(errors="replace")[-4000:]
        except (OSError, TypeError):
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, term_wait=5.0)
            self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> HaproxyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
