"""Run a pod's container as a local process: its args, environment and working directory from the
manifest, its volumes as directories, and the generated cluster config.

What differs from a cluster, and only that: absolute paths (/mnt/models, /home/model-server) are
moved under a run directory, `torchserve` is the launcher of this environment and
`torchserve-xai-oip` (the front server of the KServe runtime) this interpreter's `-m oip`, and the
listeners (the config's TorchServe addresses, the front server's --http-port/--grpc-port) move to
free loopback ports (with free gRPC ports), so several pods run side by side. The environment is the container's alone (plus PATH,
HOME, LANG and JAVA_HOME), not the test's: with enable_envvars_config=true, a stray TS_* variable
of the test process would otherwise change the server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from tools import kserve_config
from tools.http_client import http_request
from tools.ports import free_ports
from tools.torchserve import pid_is_alive, torchserve_launcher
from tools.prometheus import PrometheusServer

ABSOLUTE_ROOTS = ("/mnt/models", "/home/model-server")
FRONT_SERVER = "torchserve-xai-oip"


class PodError(RuntimeError):
    pass


class EmulatedPod:
    """One container of a manifest, started as a process group; a context manager."""

    def __init__(self, container: Mapping, *, target: str, model_config: Mapping, model_name: str,
                 archives: list[Path], run_dir: Path, labels: Mapping[str, str] | None = None,
                 startup_timeout: float = 180.0) -> None:
        self.container = container
        self.run_dir = Path(run_dir)
        self.labels = dict(labels or {})  # KServe's template values ({{.Labels.X}})
        self.model_name = model_name
        self.startup_timeout = startup_timeout
        self.paths = {root: self.run_dir / root.strip("/").replace("/", "_") for root in ABSOLUTE_ROOTS}
        inference, management, metrics, grpc_inference, grpc_management, front_http, front_grpc = free_ports(7)
        self.front_http_port, self.front_grpc_port = front_http, front_grpc
        self.inference_url = f"http://127.0.0.1:{inference}"
        self.management_url = f"http://127.0.0.1:{management}"
        self.metrics_url = f"http://127.0.0.1:{metrics}"
        addresses = kserve_config.ClusterAddresses(self.inference_url, self.management_url, self.metrics_url, "127.0.0.1")
        self.config = kserve_config.cluster_properties(model_config, model_name=model_name, target=target,
                                                       addresses=addresses, models_root=str(self.paths["/mnt/models"]))
        self.config.update(grpc_inference_port=str(grpc_inference), grpc_management_port=str(grpc_management))
        self.archives = [Path(path) for path in archives]
        self._process: subprocess.Popen | None = None
        self._log = None

    # -- what the pod runs --------------------------------------------------------------------

    def mapped(self, value: str) -> str:
        for root, local in self.paths.items():
            value = value.replace(root, str(local))
        return value

    def templated(self, value: str) -> str:
        for label, label_value in self.labels.items():
            value = value.replace("{{.Labels.%s}}" % label, label_value)
        if "{{" in value:
            raise PodError(f"unresolved template in {value!r}: pass its label")
        return value

    @property
    def runs_front_server(self) -> bool:
        arguments = list(self.container.get("command", [])) + list(self.container.get("args", []))
        return arguments[0] == FRONT_SERVER

    @property
    def url(self) -> str:
        """What the container's port 8080 serves: the front server, else TorchServe's inference API."""
        return f"http://127.0.0.1:{self.front_http_port}" if self.runs_front_server else self.inference_url

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.front_grpc_port}"

    def command(self) -> list[str]:
        arguments = list(self.container.get("command", [])) + list(self.container.get("args", []))
        if arguments[0] == "torchserve":
            return [str(torchserve_launcher())] + [self.mapped(argument) for argument in arguments[1:]]
        if arguments[0] != FRONT_SERVER:
            raise PodError(f"the container runs neither torchserve nor {FRONT_SERVER}: {arguments}")
        moved = {"--http-port": self.front_http_port, "--grpc-port": self.front_grpc_port}
        command = [sys.executable, "-m", "oip", "--host", "127.0.0.1"]
        for argument in arguments[1:]:
            option = argument.partition("=")[0]
            command.append(f"{option}={moved[option]}" if option in moved else self.mapped(argument))
        return command

    def environment(self) -> dict[str, str]:
        environment = {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
            "HOME": str(self.paths["/home/model-server"]),
            "LANG": "C.UTF-8",
            # The image runs one thread pool per worker too; keep the test from oversubscribing.
            "OMP_WAIT_POLICY": "PASSIVE",
        }
        if "JAVA_HOME" in os.environ:
            environment["JAVA_HOME"] = os.environ["JAVA_HOME"]
        for entry in self.container.get("env", []):
            if "value" not in entry:
                raise PodError(f"env {entry['name']} is not a plain value; emulate it explicitly")
            environment[entry["name"]] = self.mapped(self.templated(entry["value"]))
        return environment

    def working_dir(self) -> Path:
        return Path(self.mapped(self.container.get("workingDir", "/home/model-server")))

    def _prepare(self) -> None:
        models = self.paths["/mnt/models"]
        (models / "config").mkdir(parents=True, exist_ok=True)
        (models / "model-store").mkdir(parents=True, exist_ok=True)
        header = f"# Emulated pod: the generated {self.container.get('name')} config, listeners on loopback."
        (models / "config" / kserve_config.CONFIG_NAME).write_text(
            header + "\n" + "\n".join(f"{key}={value}" for key, value in self.config.items()) + "\n")
        shutil.copy(kserve_config.METRICS_YAML, models / "config" / kserve_config.METRICS_NAME)
        for archive in self.archives:
            shutil.copy(archive, models / "model-store" / archive.name)
        for mount in self.container.get("volumeMounts", []):
            Path(self.mapped(mount["mountPath"])).mkdir(parents=True, exist_ok=True)
        self.working_dir().mkdir(parents=True, exist_ok=True)

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> EmulatedPod:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def log_path(self) -> Path:
        return self.run_dir / "console.log"

    def start(self) -> EmulatedPod:
        self._prepare()
        self._log = self.log_path.open("wb")
        self._process = subprocess.Popen(self.command(), cwd=self.working_dir(), env=self.environment(),
                                         stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ready(self) -> None:
        """/ping Healthy (what the probes ask) and the model's worker READY."""
        deadline = time.monotonic() + self.startup_timeout
        state = "not started"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise PodError(f"the pod's torchserve exited ({self._process.returncode})\n{self.log_tail()}")
            try:
                ping = http_request(self.inference_url + "/ping", timeout=2)
                described = http_request(f"{self.management_url}/models/{self.model_name}", timeout=2)
                workers = described.json()[0].get("workers", []) if described.status == 200 else []
                front = http_request(self.url + "/v2/health/ready", timeout=2).status if self.runs_front_server else 200
                if ping.status == 200 and front == 200 and any(worker.get("status") == "READY" for worker in workers):
                    return
                state = f"/ping {ping.status}, front {front}, model {described.status}, workers {workers}"
            except OSError as error:
                state = f"not answering: {error}"
            time.sleep(0.5)
        raise PodError(f"pod not ready in time ({state})\n{self.log_tail()}")

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group (as the kubelet does after preStop), then SIGKILL."""
        process, self._process = self._process, None
        if process is not None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                if process.poll() is not None and not _group_members(process.pid):
                    break
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and (process.poll() is None or _group_members(process.pid)):
                    time.sleep(0.1)
            process.poll()
        if self._log is not None:
            self._log.close()
            self._log = None

    def signal(self, signal_number: int) -> None:
        """Signal the whole process group, as the image's init (tini -g) passes the kubelet's
        SIGTERM on, or as a dying node takes every process of the pod (SIGKILL)."""
        if self._process is not None:
            try:
                os.killpg(self._process.pid, signal_number)
            except ProcessLookupError:
                pass

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for path in [self.log_path, *sorted(self.paths["/home/model-server"].rglob("*.log"))]:
            if path.is_file():
                parts.append(f"--- {path} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)


def _group_members(group_id: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == group_id and pid_is_alive(int(entry.name)):
                    members.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return members


class LabelledPrometheus(PrometheusServer):
    """A PrometheusServer whose targets carry labels, as kubernetes_sd relabelling gives pods
    (namespace, pod): the autoscaling queries select pods by them."""

    def __init__(self, target_labels: Mapping[str, Mapping[str, str]], **options) -> None:
        super().__init__(targets=list(target_labels), **options)
        self.target_labels = {target: dict(labels) for target, labels in target_labels.items()}

    def config_text(self) -> str:
        config = json.loads(super().config_text())
        config["scrape_configs"][0]["static_configs"] = [
            {"targets": [target], "labels": labels} for target, labels in self.target_labels.items()]
        return json.dumps(config, indent=2)
