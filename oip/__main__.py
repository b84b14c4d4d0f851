"""The Open Inference Protocol front server in front of TorchServe.

In front of a running TorchServe (``make serve-kserve`` starts one with tools.serve_kserve):

    python -m oip --torchserve http://127.0.0.1:8080 --model shapes [--key-file run/8080/key_file.json] \\
        --host 127.0.0.1 --http-port 8088 --grpc-port 8089

Owning TorchServe, as the runtime image does in a pod: starts ``torchserve --foreground`` with the
given config and model store as its child, serves the models of the config's ``model_snapshot``,
reads the inference key from ``key_file.json`` when the config keeps token auth on, and exits
(stopping TorchServe and its workers) on SIGTERM, or with status 1 when TorchServe dies:

    python -m oip --ts-config /mnt/models/config/config.properties \\
        --model-store /mnt/models/model-store --http-port 8080 --grpc-port 8081
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

KEY_FILE_NAME = "key_file.json"


def read_properties(path: Path) -> dict[str, str]:
    entries = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, _, value = line.partition("=")
            entries[key.strip()] = value.strip()
    return entries


def snapshot_models(config: dict[str, str]) -> list[str]:
    """Model names from ``model_snapshot`` (or ``load_models``) of a TorchServe config."""
    if config.get("model_snapshot"):
        return list(json.loads(config["model_snapshot"])["models"])
    names = []
    for spec in config.get("load_models", "").split(","):
        name, separator, archive = spec.strip().partition("=")
        if spec.strip() and spec.strip() != "all":
            names.append(name if separator else Path(name).stem)
    return names


def loopback_url(address: str) -> str:
    """TorchServe's inference address as the front server dials it (0.0.0.0 means any: loopback)."""
    return address.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]").rstrip("/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m oip", description=__doc__.splitlines()[0])
    parser.add_argument("--torchserve", help="TorchServe's inference URL (not with --ts-config)")
    parser.add_argument("--key-file", type=Path, help="TorchServe's key_file.json when its token auth is on")
    parser.add_argument("--management", help="TorchServe's management URL: the model's explainers for its metadata, "
                                             "and renewing an expired inference key")
    parser.add_argument("--model", action="append", default=[], metavar="NAME[=TORCHSERVE_NAME]",
                        help="a model to serve (repeatable); default: the config's model_snapshot")
    parser.add_argument("--ts-config", type=Path, help="start TorchServe with this config.properties and own it")
    parser.add_argument("--model-store", type=Path, help="TorchServe's model store (with --ts-config)")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind REST and gRPC (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=8080, help="OIP REST (default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=8081, help="OIP gRPC (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per TorchServe request")
    parser.add_argument("--access-log", action="store_true", help="log every request (off by default: TorchServe logs them too)")
    return parser


class OwnedTorchServe:
    """TorchServe as this process's child, in this process group (so ``tini -g`` or a pod's
    SIGTERM reaches both); stopped with every descendant when the front server leaves."""

    def __init__(self, config: Path, model_store: Path | None):
        command = [shutil.which("torchserve") or str(Path(sys.executable).with_name("torchserve")),
                   "--start", "--foreground", "--ncs", f"--ts-config={config}"]
        if model_store is not None:
            command.append(f"--model-store={model_store}")
        self.command = command
        self.process: subprocess.Popen | None = None
        self.died_on_its_own = False
        self._stopping = False

    def start(self, on_death) -> None:
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)

        def watch():
            self.process.wait()
            if not self._stopping:
                self.died_on_its_own = True
                logging.getLogger("oip").error("TorchServe exited (%s): stopping the front server", self.process.returncode)
                on_death()

        threading.Thread(target=watch, name="torchserve-watch", daemon=True).start()

    def stop(self, timeout: float = 20.0) -> None:
        import psutil

        self._stopping = True
        if self.process is None:
            return
        try:
            tree = [psutil.Process(self.process.pid)] + psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        for member in tree:
            try:
                member.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=timeout)
        for member in alive:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.torchserve) == bool(args.ts_config):
        print("error: give either --torchserve URL or --ts-config FILE", file=sys.stderr)
        return 2
    owned = None
    if args.ts_config:
        config = read_properties(args.ts_config)
        inference = loopback_url(config.get("inference_address", "http://127.0.0.1:8080"))
        auth_off = config.get("disable_token_authorization", "false").lower() == "true"
        key_file = None if auth_off else Path.cwd() / KEY_FILE_NAME
        management = loopback_url(config.get("management_address", "http://127.0.0.1:8081"))
        names = args.model or snapshot_models(config)
        owned = OwnedTorchServe(args.ts_config, args.model_store)
    else:
        inference, key_file, names, management = args.torchserve.rstrip("/"), args.key_file, args.model, args.management
    if not names:
        print("error: no model to serve (--model NAME, or a config with model_snapshot)", file=sys.stderr)
        return 2
    # KServe parses sys.argv when its model_server module is imported: give it none of ours.
    sys.argv = sys.argv[:1]
    from .model import TorchServeModel
    from .server import FrontServer
    from .upstream import TorchServeUpstream

    upstream = TorchServeUpstream(inference, key_file=key_file, management_url=management, timeout_s=args.timeout)
    models = []
    for spec in names:
        name, _, torchserve_name = spec.partition("=")
        models.append(TorchServeModel(name, upstream, torchserve_name or name))
    server = FrontServer(args.host, args.http_port, args.grpc_port, access_log=args.access_log)
    if owned is not None:
        owned.start(on_death=lambda: os.kill(os.getpid(), signal.SIGTERM))
    print(f"OIP front server: REST http://{args.host}:{args.http_port}, gRPC {args.host}:{args.grpc_port}, "
          f"models {', '.join(model.name for model in models)} -> TorchServe {inference}", flush=True)
    try:
        server.start(models)
    finally:
        if owned is not None:
            owned.stop()
    return 1 if owned is not None and owned.died_on_its_own else 0


if __name__ == "__main__":
    sys.exit(main())
