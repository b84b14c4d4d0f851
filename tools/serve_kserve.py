"""TorchServe and the Open Inference Protocol front server (package oip) on loopback, for
`make serve-kserve`, the tests and the benchmark, until Ctrl-C or SIGTERM.

    python -m tools.serve_kserve --model-store model_store --models shapes=shapes.mar \
        --config deploy/torchserve/local.properties

TorchServe runs as for `make serve` (TS_*_ADDRESS, run/<inference port>/), with token auth ON:
only the front server talks to it, with the inference key it reads from key_file.json. The front
server answers OIP REST on 127.0.0.1:${OIP_HTTP_PORT:-8088} and gRPC on ${OIP_GRPC_PORT:-8089}.
Stopping takes both down with all their processes (each is its own process group).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from tools.http_client import http_request
from tools.ports import LOOPBACK, free_ports, port_is_free
from tools.processes import stop_process_group
from tools.serve import StopRequested, addresses_from_environment, raise_stop_requested
from tools.torchserve import ServerAddresses, TorchServeError, TorchServeProcess, parse_model_specs

DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT = 8088, 8089


class FrontServerProcess:
    """``python -m oip`` in front of a running TorchServe, in its own process group."""

    def __init__(self, torchserve: TorchServeProcess, models: Iterable[str], log_path: Path, *,
                 http_port: int | None = None, grpc_port: int | None = None, startup_timeout: float = 60.0):
        self.torchserve = torchserve
        self.models = list(models)
        self.log_path = Path(log_path)
        if http_port is None or grpc_port is None:
            free_http, free_grpc = free_ports(2)
            http_port, grpc_port = http_port or free_http, grpc_port or free_grpc
        self.http_port, self.grpc_port = http_port, grpc_port
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "oip", "--torchserve", self.torchserve.inference_url, "--host", LOOPBACK,
                   "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                   "--management", self.torchserve.management_url]
        if self.torchserve.token_auth:
            command += ["--key-file", str(self.torchserve.key_file)]
        for model in self.models:
            command += ["--model", model]
        return command

    def start(self) -> FrontServerProcess:
        for port in (self.http_port, self.grpc_port):
            if not port_is_free(port):
                raise TorchServeError(f"port {port} is already in use")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self._process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        state = "not started"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise TorchServeError(f"the front server exited ({self._process.returncode})\n{self.log_tail()}")
            try:
                reply = http_request(self.url + "/v2/health/ready", timeout=2)
                if reply.status == 200 and not port_is_free(self.grpc_port):
                    return
                state = f"/v2/health/ready {reply.status}"
            except OSError as error:
                state = f"not answering: {error}"
            time.sleep(0.2)
        raise TorchServeError(f"front server not ready in time ({state})\n{self.log_tail()}")

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process_group(process)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class KServeStack:
    """TorchServe (token auth on) + the front server; a context manager, stopped even on error."""

    def __init__(self, model_store: Path | str, models: Mapping[str, str] | Iterable[str], run_dir: Path | str, *,
                 addresses: ServerAddresses | None = None, config_template: Path | str | None = None,
                 config: Mapping[str, str] | None = None, http_port: int | None = None, grpc_port: int | None = None,
                 token_auth: bool = True, startup_timeout: float = 180.0, console: bool = False):
        self.run_dir = Path(run_dir)
        self.torchserve = TorchServeProcess(model_store, parse_model_specs(models), self.run_dir, addresses=addresses,
                                            token_auth=token_auth, config_template=config_template, config=config,
                                            startup_timeout=startup_timeout, console=console)
        self.front = FrontServerProcess(self.torchserve, self.torchserve.models, self.run_dir / "logs" / "oip.log",
                                        http_port=http_port, grpc_port=grpc_port)

    def __enter__(self) -> KServeStack:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> KServeStack:
        try:
            self.torchserve.start()
            self.front.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            self.front.stop()
        finally:
            self.torchserve.stop()

    def is_running(self) -> bool:
        return self.torchserve.is_running() and self.front.is_running()


def ports_from_environment(environment: Mapping[str, str] = os.environ) -> tuple[int, int]:
    ports = []
    for variable, default in (("OIP_HTTP_PORT", DEFAULT_HTTP_PORT), ("OIP_GRPC_PORT", DEFAULT_GRPC_PORT)):
        value = environment.get(variable, "").strip() or str(default)
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise ValueError(f"{variable}={value!r}: expected a port number")
        ports.append(int(value))
    return ports[0], ports[1]


def example_calls(stack: KServeStack, model: str, image: Path) -> list[str]:
    url = stack.front.url
    tensor = (f'{{\\"name\\": \\"image\\", \\"shape\\": [1], \\"datatype\\": \\"BYTES\\", '
              f'\\"data\\": [\\"$(base64 -w0 {image})\\"]}}')
    return [
        f"  curl -s {url}/v2/models/{model}/ready",
        f"  curl -s {url}/v2/models/{model}",
        f"  curl -s -X POST {url}/v2/models/{model}/infer -H 'Content-Type: application/json' "
        f"-d \"{{\\\"inputs\\\": [{tensor}]}}\"",
        f"  curl -s -X POST {url}/v2/models/{model}/explain -H 'Content-Type: application/json' "
        f"-d \"{{\\\"inputs\\\": [{tensor}], \\\"parameters\\\": {{\\\"explain\\\": \\\"grad_cam\\\", "
        f"\\\"encoding\\\": \\\"png\\\"}}}}\"",
        "  (FP16 maps, the default encoding, come in the binary tensor extension: use tritonclient or",
        "   kserve.InferenceRESTClient; docs/explanations-as-tensors.md has the protocol)",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.serve_kserve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=FILE.mar")
    parser.add_argument("--config", type=Path, help="config.properties template")
    parser.add_argument("--run-root", type=Path, default=Path("run"))
    parser.add_argument("--example-image", type=Path)
    args = parser.parse_args(argv)
    try:
        addresses = addresses_from_environment()
        http_port, grpc_port = ports_from_environment()
    except ValueError as error:
        parser.error(str(error))
    run_dir = args.run_root / str(urlsplit(addresses.inference).port)
    for signal_number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signal_number, raise_stop_requested)
    stack = KServeStack(args.model_store, args.models, run_dir, addresses=addresses, config_template=args.config,
                        http_port=http_port, grpc_port=grpc_port)
    models = list(stack.torchserve.models)
    print(f"Starting TorchServe with {', '.join(models)} and the OIP front server (run dir {run_dir}) ...", flush=True)
    try:
        stack.start()
        lines = [f"Serving {', '.join(models)} over the Open Inference Protocol (KServe v2):",
                 f"  REST: {stack.front.url}   (/v2/health/ready, /v2/models/{models[0]}/infer, .../explain)",
                 f"  gRPC: {stack.front.grpc_address}",
                 f"  TorchServe behind it: {stack.torchserve.inference_url} (token auth on; keys in "
                 f"{stack.torchserve.key_file}), metrics {stack.torchserve.metrics_url}/metrics",
                 f"Logs: {run_dir / 'logs'} (front server: oip.log).  Ctrl-C stops both."]
        if args.example_image:
            lines += ["", "Try it:", *example_calls(stack, models[0], args.example_image)]
        print("\n".join(lines), flush=True)
        while stack.is_running():
            time.sleep(0.5)
        print("A server exited on its own:\n" + stack.front.log_tail() + "\n" + stack.torchserve.log_tail(), file=sys.stderr)
        return 1
    except TorchServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, StopRequested):
        print("\nStopping the front server, TorchServe and its workers ...", flush=True)
        return 0
    finally:
        for signal_number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signal_number, signal.SIG_IGN)
        stack.stop()
        print("Stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
