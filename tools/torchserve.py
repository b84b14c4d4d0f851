"""Start, watch and stop one TorchServe 0.12 server, isolated enough to run several side by side.

What isolation takes (found by reading TorchServe 0.12's launcher and frontend):

- The `torchserve` launcher keeps its pid file at `tempfile.gettempdir()/.model_server.pid` and
  refuses to start while that names a live server, so a second server sharing the temp dir never
  starts. We point TMPDIR/TEMP/TMP at the run dir.
- The Java frontend puts its worker sockets at `<java.io.tmpdir>/.ts.sock.<port>` with ports
  counted from `initial_worker_port` (9000), and a starting Python worker deletes whatever file is
  at its socket path. Two servers sharing /tmp therefore unlink each other's sockets, and a worker
  starting in one can be reached by the other's frontend. The launcher maps $TEMP to
  -Djava.io.tmpdir, so the same run-dir temp gives each server its own socket directory.
- gRPC listeners bind 7070/7071 by default; each server gets free ports for them.
- The frontend writes logs and metrics logs to $LOG_LOCATION / $METRICS_LOCATION, the extracted
  model archives to java.io.tmpdir, and the token file `key_file.json` to its working directory:
  all of them land in the run dir.

The server runs in a new session, so it is its own process group (launcher -> java -> Python
workers): `stop()` signals that group, which reaches every worker even after the launcher died.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO
from urllib.parse import urlsplit

import psutil

from tools.http_client import HttpReply, http_request
from tools.ports import LOOPBACK, free_ports, port_is_free

KEY_FILE_NAME = "key_file.json"
WORKER_SCRIPT_MARKER = "model_service_worker"
FRONTEND_CLASS_MARKER = "org.pytorch.serve.ModelServer"
LAUNCHER_PID_FILE_NAME = ".model_server.pid"
# Unix socket paths are limited to 107 bytes; the frontend appends ".ts.sock.<port>".
MAX_UNIX_SOCKET_PATH = 107
LONGEST_SOCKET_NAME = ".ts.sock.65535"

# Keys this class owns: a template or extra entry setting one would be silently overridden.
MANAGED_KEYS = frozenset(
    {
        "inference_address",
        "management_address",
        "metrics_address",
        "grpc_inference_port",
        "grpc_management_port",
        "model_store",
        "load_models",
        "disable_token_authorization",
    }
)
# Environment variables the frontend reads in place of our config file or its entries.
SCRUBBED_ENVIRONMENT = (
    "TS_CONFIG_FILE",
    "TS_INFERENCE_ADDRESS",
    "TS_MANAGEMENT_ADDRESS",
    "TS_METRICS_ADDRESS",
    "TS_MODEL_STORE",
    "TS_LOAD_MODELS",
)


class TorchServeError(RuntimeError):
    """The server could not be started, or did not become ready in time."""


@dataclass(frozen=True)
class ServerAddresses:
    inference: str
    management: str
    metrics: str

    @classmethod
    def free_loopback(cls) -> ServerAddresses:
        inference, management, metrics = free_ports(3)
        return cls.on_loopback(inference, management, metrics)

    @classmethod
    def on_loopback(cls, inference: int, management: int, metrics: int) -> ServerAddresses:
        return cls(f"http://{LOOPBACK}:{inference}", f"http://{LOOPBACK}:{management}", f"http://{LOOPBACK}:{metrics}")

    def as_dict(self) -> dict[str, str]:
        return {"inference": self.inference, "management": self.management, "metrics": self.metrics}


def parse_model_specs(models: Mapping[str, str] | Iterable[str]) -> dict[str, str]:
    """{"name": "file.mar"} or ["name=file.mar", "other.mar"] -> {name: archive}.

    A bare "other.mar" is named after the file, which is TorchServe's name for it only when the
    archive was built with that model name: prefer the explicit form.
    """
    if isinstance(models, Mapping):
        return dict(models)
    parsed = {}
    for spec in models:
        name, separator, archive = spec.partition("=")
        if not separator:
            name, archive = Path(spec).stem, spec
        if not name or not archive:
            raise ValueError(f"model spec {spec!r} is not NAME=ARCHIVE")
        parsed[name] = archive
    return parsed


def read_properties(path: Path) -> dict[str, str]:
    """Java-properties subset TorchServe's own launcher understands: key=value lines, # comments."""
    entries = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, _, value = line.partition("=")
            entries[key.strip()] = value.strip()
    return entries


def pid_is_alive(pid: int) -> bool:
    """A zombie counts as dead: it runs nothing and only waits for its parent to reap it."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def torchserve_launcher() -> Path:
    """The `torchserve` script of the running interpreter's environment (not whatever is on PATH)."""
    launcher = Path(sys.executable).with_name("torchserve")
    if not launcher.exists():
        raise TorchServeError(f"no torchserve launcher next to {sys.executable}; is torchserve installed there?")
    return launcher


# Keys whose value is a file: a relative path in a template is relative to the template's folder.
PATH_KEYS = ("metrics_config",)


def _template_config(template: Path) -> dict[str, str]:
    entries = dict(read_properties(template))
    for key in PATH_KEYS:
        if key in entries and not Path(entries[key]).is_absolute():
            entries[key] = str((template.parent / entries[key]).resolve())
    return entries


class TorchServeProcess:
    """One TorchServe server with its own config, logs, temp dir, sockets and token file.

        with TorchServeProcess(model_store, ["tiny=tiny.mar"], run_dir) as server:
            reply = server.request("POST", "/predictions/tiny", png_bytes, {"Content-Type": "image/png"})

    Entering starts the server and waits until it is ready (see `wait_until_ready`); leaving
    stops the whole process group, also when the body raised.
    """

    def __init__(
        self,
        model_store: Path | str,
        models: Mapping[str, str] | Iterable[str],
        run_dir: Path | str,
        *,
        addresses: ServerAddresses | None = None,
        token_auth: bool = False,
        config: Mapping[str, str] | None = None,
        config_template: Path | str | None = None,
        startup_timeout: float = 120.0,
        stop_timeout: float = 20.0,
        console: bool = False,
    ) -> None:
        """
        model_store: directory holding the archives. models: what to load at startup.
        run_dir: created if missing; holds config.properties, logs/, tmp/ and, with token auth,
            key_file.json. addresses: default free loopback ports.
        config: extra config.properties entries (e.g. metrics_mode=prometheus) on top of
            config_template, a properties file. Neither may set a key this class manages.
        console: let the server's output through to our stdout/stderr (for `make serve`)
            instead of run_dir/logs/console.log.
        """
        self.model_store = Path(model_store).resolve()
        self.models = parse_model_specs(models)
        self.run_dir = Path(run_dir).resolve()
        self.addresses = addresses or ServerAddresses.free_loopback()
        self.token_auth = token_auth
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.console = console
        self.extra_config = _template_config(Path(config_template)) if config_template else {}
        self.extra_config.update(config or {})
        clashing = MANAGED_KEYS & self.extra_config.keys()
        if clashing:
            raise ValueError(f"config sets keys TorchServeProcess manages: {sorted(clashing)}")
        self._process: subprocess.Popen | None = None
        self._console_log: IO[bytes] | None = None
        self._tokens: dict[str, str] = {}

    # -- locations ----------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.properties"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def temp_dir(self) -> Path:
        return self.run_dir / "tmp"

    @property
    def key_file(self) -> Path:
        # The frontend writes it into its working directory, which is the run dir.
        return self.run_dir / KEY_FILE_NAME

    @property
    def console_log(self) -> Path:
        return self.log_dir / "console.log"

    @property
    def inference_url(self) -> str:
        return self.addresses.inference

    @property
    def management_url(self) -> str:
        return self.addresses.management

    @property
    def metrics_url(self) -> str:
        return self.addresses.metrics

    def url(self, path: str, api: str = "inference") -> str:
        base = self.addresses.as_dict()[api]
        return base + (path if path.startswith("/") else "/" + path)

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> TorchServeProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> TorchServeProcess:
        if self._process is not None:
            raise TorchServeError("already started")
        self._prepare_run_dir()
        self._refuse_busy_ports()
        command = [str(torchserve_launcher()), "--start", "--foreground", "--ncs", "--ts-config", str(self.config_path)]
        if not self.token_auth:
            command.append("--disable-token-auth")
        output = None
        if not self.console:
            self._console_log = self.console_log.open("wb")  # this run only: log_tail shows no stale lines
            output = self._console_log
        self._process = subprocess.Popen(
            command,
            cwd=self.run_dir,
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            start_new_session=True,
        )
        (self.run_dir / "torchserve.pid").write_text(f"{self._process.pid}\n")
        try:
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Block until /ping says Healthy and every model has a READY worker.

        Neither alone is enough: /ping reports Healthy while a model's workers are still loading
        if its minWorkers is 0 and, with token auth, needs the inference key like any other call;
        the management description is what shows workers READY. The frontend registers startup
        models before it binds any listener, so once the management API answers, a model it does
        not know failed to load: that fails at once instead of at the timeout.
        """
        deadline = time.monotonic() + (timeout if timeout is not None else self.startup_timeout)
        last_state = "not started"
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise TorchServeError(f"TorchServe exited (code {code}) before it was ready\n{self.log_tail()}")
            try:
                last_state = self._readiness_problem()
            except OSError as error:
                last_state = f"not answering: {error}"
            if not last_state:
                return
            time.sleep(0.25)
        raise TorchServeError(f"TorchServe not ready after the timeout ({last_state})\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the process group, wait, then SIGKILL whatever is left. Safe to call twice."""
        process, self._process = self._process, None
        if process is None:
            return
        group_id = process.pid  # start_new_session makes the launcher the group leader
        members = set(self.process_pids(process.pid))
        self._signal_group(group_id, signal.SIGTERM)
        survivors = self._wait_for_exit(process, members, self.stop_timeout)
        # The frontend may have replaced a worker that died of the SIGTERM before it died itself:
        # that newcomer was not in the snapshot, but it is in the group.
        survivors = sorted(set(survivors) | set(self.process_pids(group_id)))
        if survivors:
            self._signal_group(group_id, signal.SIGKILL)
            for pid in survivors:  # a member that left the group still goes
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._wait_for_exit(process, survivors, 5.0)
        if self._console_log is not None:
            self._console_log.close()
            self._console_log = None
        # The token file is a secret and the launcher's pid file now names a dead process.
        self.key_file.unlink(missing_ok=True)
        (self.temp_dir / LAUNCHER_PID_FILE_NAME).unlink(missing_ok=True)
        (self.run_dir / "torchserve.pid").unlink(missing_ok=True)
        self._tokens = {}

    @property
    def pid(self) -> int | None:
        """The launcher's pid, which is also the process group id of the whole server."""
        return None if self._process is None else self._process.pid

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- processes ----------------------------------------------------------------------------

    def process_pids(self, root: int | None = None) -> list[int]:
        """Launcher, frontend and workers: the tree under the launcher plus its process group."""
        root = root if root is not None else self.pid
        if root is None:
            return []
        pids = set()
        try:
            launcher = psutil.Process(root)
            pids = {root} | {child.pid for child in launcher.children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) == root:
                    pids.add(process.pid)
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
        return sorted(pid for pid in pids if pid_is_alive(pid))

    def frontend_pid(self) -> int | None:
        return next(iter(self._pids_with(FRONTEND_CLASS_MARKER)), None)

    def worker_pids(self) -> list[int]:
        """Python backend workers of this server (for fault tests: SIGKILL one, watch recovery)."""
        return self._pids_with(WORKER_SCRIPT_MARKER)

    def _pids_with(self, marker: str) -> list[int]:
        found = []
        for pid in self.process_pids():
            try:
                if any(marker in part for part in psutil.Process(pid).cmdline()):
                    found.append(pid)
            except psutil.NoSuchProcess:
                continue
        return found

    # -- talking to it ------------------------------------------------------------------------

    @property
    def inference_token(self) -> str | None:
        return self._token("inference")

    @property
    def management_token(self) -> str | None:
        return self._token("management")

    def auth_headers(self, api: str = "inference") -> dict[str, str]:
        """`Authorization: Bearer <key>` for the given API; empty when token auth is off.

        The metrics API takes no token.
        """
        token = self._token(api) if api in ("inference", "management") else None
        return {"Authorization": f"Bearer {token}"} if token else {}

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        api: str = "inference",
        timeout: float = 30.0,
    ) -> HttpReply:
        """One HTTP call to this server, with the right token when token auth is on."""
        all_headers = {**self.auth_headers(api), **(headers or {})}
        return http_request(self.url(path, api), method, body, all_headers, timeout)

    def describe_model(self, name: str) -> dict:
        """The management API's description (workers, batching) of the model's default version."""
        reply = self.request("GET", f"/models/{name}", api="management")
        if reply.status != 200:
            raise TorchServeError(f"describe {name}: HTTP {reply.status} {reply.text}")
        return reply.json()[0]

    def log_tail(self, lines: int = 60) -> str:
        sources = [self.console_log] if self.console_log.exists() else [self.log_dir / "ts_log.log", self.log_dir / "model_log.log"]
        parts = []
        for source in sources:
            if source.exists():
                tail = source.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- last lines of {source} ---\n" + "\n".join(tail))
        return "\n".join(parts) or f"(no logs under {self.log_dir})"

    # -- internals ----------------------------------------------------------------------------

    def _prepare_run_dir(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        socket_path = self.temp_dir / LONGEST_SOCKET_NAME
        if len(os.fsencode(socket_path)) > MAX_UNIX_SOCKET_PATH:
            raise TorchServeError(f"run dir too deep for worker sockets ({socket_path}); use a shorter path")
        # A key file left by an earlier run would be read before the new server writes its own.
        self.key_file.unlink(missing_ok=True)
        self.config_path.write_text(self._config_text())

    def _config_text(self) -> str:
        grpc_inference, grpc_management = free_ports(2)
        entries = {
            **self.extra_config,
            "inference_address": self.addresses.inference,
            "management_address": self.addresses.management,
            "metrics_address": self.addresses.metrics,
            "grpc_inference_port": str(grpc_inference),
            "grpc_management_port": str(grpc_management),
            "model_store": str(self.model_store),
            "load_models": ",".join(f"{name}={archive}" for name, archive in self.models.items()),
            "disable_token_authorization": "false" if self.token_auth else "true",
        }
        lines = ["# Written by tools.torchserve for this run; regenerated at every start."]
        lines += [f"{key}={value}" for key, value in entries.items()]
        return "\n".join(lines) + "\n"

    def _environment(self) -> dict[str, str]:
        environment = {key: value for key, value in os.environ.items() if key not in SCRUBBED_ENVIRONMENT}
        environment.update(
            LOG_LOCATION=str(self.log_dir),
            METRICS_LOCATION=str(self.log_dir),
            TEMP=str(self.temp_dir),
            TMPDIR=str(self.temp_dir),
            TMP=str(self.temp_dir),
        )
        return environment

    def _refuse_busy_ports(self) -> None:
        for api, address in self.addresses.as_dict().items():
            parts = urlsplit(address)
            if parts.port is not None and not port_is_free(parts.port, parts.hostname or LOOPBACK):
                raise TorchServeError(f"{api} address {address} is already in use")

    def _readiness_problem(self) -> str:
        """Empty when ready, else what is still missing (shown if the wait times out)."""
        if self.token_auth and not self._load_tokens():
            return f"no token file at {self.key_file} yet"
        ping = self.request("GET", "/ping", timeout=2.0)
        status = ping.json().get("status") if ping.status == 200 else None
        if status != "Healthy":
            return f"/ping answered {ping.status} {ping.text.strip()}"
        for name in self.models:
            reply = self.request("GET", f"/models/{name}", api="management", timeout=2.0)
            if reply.status == 404:
                # Startup models are registered before any listener binds, so a model unknown
                # now failed to load and never will: say so now rather than at the timeout.
                raise TorchServeError(f"model {name} was not registered ({reply.text.strip()})\n{self.log_tail()}")
            if reply.status != 200:
                return f"model {name}: management API answered {reply.status}"
            description = reply.json()[0]
            ready = sum(worker.get("status") == "READY" for worker in description.get("workers", []))
            if ready < max(1, description.get("minWorkers", 1)):
                return f"model {name}: {ready} READY workers"
        return ""

    def _load_tokens(self) -> bool:
        if self._tokens:
            return True
        try:
            keys = json.loads(self.key_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or half written
            return False
        self._tokens = {api: keys[api]["key"] for api in ("inference", "management") if api in keys}
        return bool(self._tokens)

    def _token(self, api: str) -> str | None:
        if not self.token_auth:
            return None
        self._load_tokens()
        return self._tokens.get(api)

    @staticmethod
    def _signal_group(group_id: int, signal_number: int) -> None:
        try:
            os.killpg(group_id, signal_number)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _wait_for_exit(process: subprocess.Popen, pids: Iterable[int], timeout: float) -> list[int]:
        """Wait until the launcher is reaped and none of pids is alive; return those still alive."""
        deadline = time.monotonic() + timeout
        pids = set(pids)
        while True:
            if process.poll() is not None:
                pids.discard(process.pid)
            alive = sorted(pid for pid in pids if pid_is_alive(pid))
            if not alive or time.monotonic() >= deadline:
                return alive
            time.sleep(0.1)
