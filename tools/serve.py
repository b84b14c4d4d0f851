"""Run TorchServe in the foreground for the local demo (`make serve`) until Ctrl-C or SIGTERM.

    python -m tools.serve --model-store model_store --models shapes=shapes.mar \
        --config deploy/torchserve/local.properties

Addresses default to 127.0.0.1:8080/8081/8082; TS_INFERENCE_ADDRESS, TS_MANAGEMENT_ADDRESS and
TS_METRICS_ADDRESS (e.g. http://127.0.0.1:9080) override them. Config, logs, temp files, worker
sockets and the pid file live in run/<inference port>/, so servers on different ports can run
side by side. Stopping takes the server and all its workers down (the whole process group).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from tools.torchserve import ServerAddresses, TorchServeError, TorchServeProcess

DEFAULT_ADDRESSES = ServerAddresses.on_loopback(8080, 8081, 8082)
ADDRESS_ENVIRONMENT = {
    "inference": "TS_INFERENCE_ADDRESS",
    "management": "TS_MANAGEMENT_ADDRESS",
    "metrics": "TS_METRICS_ADDRESS",
}


def addresses_from_environment(environment: dict[str, str] | os._Environ = os.environ) -> ServerAddresses:
    chosen = DEFAULT_ADDRESSES.as_dict()
    for api, variable in ADDRESS_ENVIRONMENT.items():
        value = environment.get(variable, "").strip()
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
                raise ValueError(f"{variable}={value!r}: expected an address like http://127.0.0.1:9080")
            chosen[api] = value.rstrip("/")
    return ServerAddresses(**chosen)


class StopRequested(Exception):
    """SIGTERM/SIGHUP arrived: unwind like Ctrl-C does, so the server is stopped on the way out."""


def raise_stop_requested(signal_number: int, _frame: FrameType | None) -> None:
    raise StopRequested(signal.Signals(signal_number).name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-store", type=Path, default=Path("model_store"), help="default: %(default)s")
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=FILE.mar", help="models to load")
    parser.add_argument("--config", type=Path, help="config.properties template (e.g. deploy/torchserve/local.properties)")
    parser.add_argument("--run-root", type=Path, default=Path("run"), help="run dirs go under it (default: %(default)s)")
    parser.add_argument("--token-auth", action="store_true", help="keep TorchServe's token authorization on")
    parser.add_argument("--example-image", type=Path, help="an image to show example curl calls with")
    parser.add_argument("--console", action="store_true", help="show the server's own output (default: logs only)")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        addresses = addresses_from_environment()
    except ValueError as error:
        parser.error(str(error))
    inference_port = urlsplit(addresses.inference).port
    run_dir = args.run_root / str(inference_port)
    for signal_number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signal_number, raise_stop_requested)
    server = TorchServeProcess(
        args.model_store,
        args.models,
        run_dir,
        addresses=addresses,
        token_auth=args.token_auth,
        config_template=args.config,
        startup_timeout=args.startup_timeout,
        console=args.console,
    )
    print(f"Starting TorchServe with {', '.join(server.models)} (run dir {run_dir}) ...", flush=True)
    try:
        server.start()
        print_banner(server, run_dir, args.example_image)
        while server.is_running():
            time.sleep(0.5)
        print(f"TorchServe exited on its own.\n{server.log_tail()}", file=sys.stderr)
        return 1
    except TorchServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, StopRequested):
        print("\nStopping TorchServe and its workers ...", flush=True)
        return 0
    finally:
        # Signals again while stopping would abandon the workers half way: finish the stop first.
        for signal_number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signal_number, signal.SIG_IGN)
        server.stop()
        print("TorchServe stopped.", flush=True)


def print_banner(server: TorchServeProcess, run_dir: Path, example_image: Path | None = None) -> None:
    first_model = next(iter(server.models))
    lines = [
        f"TorchServe is ready, serving: {', '.join(server.models)}",
        f"  inference:  {server.inference_url}   (POST {server.inference_url}/predictions/{first_model})",
        f"  management: {server.management_url}",
        f"  metrics:    {server.metrics_url}/metrics",
    ]
    if server.token_auth:
        lines.append(f"Token authorization is ON: keys in {server.key_file} (send 'Authorization: Bearer <key>').")
    else:
        lines.append("Token authorization is OFF (--disable-token-auth) for this local demo: keep these ports private.")
    lines.append(f"Logs: {run_dir / 'logs'}.  Ctrl-C stops the server and all its workers.")
    if example_image is not None:
        lines += ["", "Try it:", *example_calls(server.inference_url, first_model, example_image)]
    print("\n".join(lines), flush=True)


def example_calls(inference_url: str, model: str, image: Path) -> list[str]:
    """Three curl calls: predict, explain with the defaults, explain with a chosen method and target."""
    raw = f"-H 'Content-Type: image/png' --data-binary @{image}"
    document = (f'"{{\\"image\\": \\"$(base64 -w0 {image})\\", \\"explain\\": [\\"grad_cam\\"], '
                f'\\"target\\": \\"square\\", \\"encoding\\": \\"overlay\\"}}"')
    return [
        f"  curl -s -X POST {inference_url}/predictions/{model} {raw}",
        f"  curl -s -X POST {inference_url}/explanations/{model} {raw}",
        f"  curl -s -X POST {inference_url}/predictions/{model} -H 'Content-Type: application/json' -d {document}",
    ]


if __name__ == "__main__":
    sys.exit(main())
