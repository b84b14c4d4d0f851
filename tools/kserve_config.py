"""Write the TorchServe config a cluster pod runs with, from the model's model-config.yaml.

    python -m tools.kserve_config --model-config model_store/shapes/model-config.yaml \
        --model-name shapes --target kserve --out deploy/kserve/model-repository/config
    python -m tools.kserve_config ... --check     # exit 1 when the files there are stale

Writes ``config.properties`` and a copy of ``deploy/torchserve/metrics.yaml`` beside it (TorchServe
reads the metrics config from a path, so it must travel with the config).

Why it is generated and not hand-written:

- In a pod, models load from ``model_snapshot`` in config.properties (the runtime starts
  ``torchserve --start --model-store=/mnt/models/model-store --ts-config=...`` with no --models),
  and the snapshot's batchSize, workers and timeouts override the archive's model-config.yaml.
  The generator copies them from that file so the two cannot drift.
- Under KServe the pod runs our Open Inference Protocol front server (package ``oip``) on KServe's
  ports 8080 (REST v1/v2) and 8081 (gRPC v2); it starts TorchServe with this config and forwards
  to its plain inference API on loopback. So TorchServe binds 127.0.0.1:8085/8086 only, needs no
  envelope (the front server speaks the protocols) and keeps the model's own batching.
- Token auth is off. Kubernetes target: every replica would make its own random keys and no
  client can hold them all (authenticate at the edge: deploy/kubernetes/oauth2-proxy). KServe
  target: only the front server (and the pod's other containers, which share its loopback) can
  reach TorchServe, and its keys would expire after ``token_expiration_min`` with nobody to
  rotate them; authentication belongs to the ingress or mesh.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The package's copy of deploy/torchserve/metrics.yaml, so the generator works from the wheel too.
METRICS_YAML = Path(importlib.import_module("handlers").__path__[0]) / "torchserve_metrics.yaml"
CONFIG_NAME = "config.properties"
METRICS_NAME = "metrics.yaml"

# Where KServe's storage initializer puts storageUri's contents; the Deployment mounts the same.
MODELS_ROOT = "/mnt/models"
TARGETS = ("kserve", "kubernetes")


@dataclass(frozen=True)
class ClusterAddresses:
    # A Deployment's Service sends traffic to TorchServe's port 8080. Management stays on
    # loopback: with the model API off it only describes workers, and nothing outside the pod needs it.
    inference: str = "http://0.0.0.0:8080"
    management: str = "http://127.0.0.1:8081"
    metrics: str = "http://0.0.0.0:8082"
    grpc_host: str = "127.0.0.1"


# Under KServe the front server owns 8080 (REST) and 8081 (gRPC); TorchServe is reached on
# loopback only. Metrics stay on 8082 for Prometheus.
KSERVE_ADDRESSES = ClusterAddresses(inference="http://127.0.0.1:8085", management="http://127.0.0.1:8086")


def model_snapshot(model_config: Mapping[str, Any], *, model_name: str, mar_name: str, version: str) -> dict[str, Any]:
    """TorchServe's startup snapshot for one model, its settings taken from model-config.yaml."""
    batch_size = int(model_config.get("batchSize", 1))
    entry = {
        "defaultVersion": True,
        "marName": mar_name,
        "minWorkers": int(model_config.get("minWorkers", 1)),
        "maxWorkers": int(model_config.get("maxWorkers", model_config.get("minWorkers", 1))),
        "batchSize": batch_size,
        "maxBatchDelay": int(model_config.get("maxBatchDelay", 100)),
        "responseTimeout": int(model_config.get("responseTimeout", 120)),
    }
    if entry["minWorkers"] < 1 or entry["maxWorkers"] < entry["minWorkers"]:
        raise ValueError(f"workers must satisfy 1 <= minWorkers <= maxWorkers, got {entry}")
    return {"name": "startup.cfg", "modelCount": 1, "models": {model_name: {version: entry}}}


def cluster_properties(model_config: Mapping[str, Any], *, model_name: str, target: str,
                       mar_name: str | None = None, version: str = "1.0",
                       addresses: ClusterAddresses | None = None,
                       models_root: str = MODELS_ROOT) -> dict[str, str]:
    """config.properties entries for a pod of `target` ("kserve" or "kubernetes")."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if addresses is None:
        addresses = KSERVE_ADDRESSES if target == "kserve" else ClusterAddresses()
    configured = (model_config.get("handler") or {}).get("envelope")
    if configured:
        # The handler would answer in an envelope that neither the front server nor a client expects.
        raise ValueError(f"model-config.yaml sets handler.envelope={configured!r}; in a pod TorchServe serves its "
                         "plain API (under KServe the oip front server speaks the protocols): remove it")
    snapshot = model_snapshot(model_config, model_name=model_name, mar_name=mar_name or f"{model_name}.mar",
                              version=version)
    store = f"{models_root}/model-store"
    return {
        "inference_address": addresses.inference,
        "management_address": addresses.management,
        "metrics_address": addresses.metrics,
        "grpc_inference_address": addresses.grpc_host,
        "grpc_management_address": addresses.grpc_host,
        "disable_token_authorization": "true",
        "enable_model_api": "false",
        "enable_envvars_config": "false",
        "model_store": store,
        "model_snapshot": json.dumps(snapshot, separators=(",", ":")),
        "allowed_urls": f"^file://{store}/[A-Za-z0-9_.-]+[.]mar$",
        "install_py_dep_per_model": "false",
        "default_workers_per_model": str(snapshot["models"][model_name][version]["minWorkers"]),
        "max_request_size": "8388608",
        "max_response_size": "16777216",
        "metrics_mode": "prometheus",
        "metrics_config": f"{models_root}/config/{METRICS_NAME}",
    }


HEADER = {
    "kserve": "KServe pods: TorchServe on loopback behind the oip front server, token auth off (auth at the ingress/mesh), the model's batching.",
    "kubernetes": "Kubernetes Deployment pods: token auth off (auth at the edge), no envelope, the model's batch size.",
}


def render_properties(entries: Mapping[str, str], target: str, source: str) -> str:
    lines = [f"# Written by tools.kserve_config from {source}; do not edit, regenerate.",
             f"# {HEADER[target]}"]
    lines += [f"{key}={value}" for key, value in entries.items()]
    return "\n".join(lines) + "\n"


def parse_properties(text: str) -> dict[str, str]:
    entries = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, _, value = line.partition("=")
            entries[key.strip()] = value.strip()
    return entries


def generated_files(model_config_path: Path, *, model_name: str, target: str, mar_name: str | None = None,
                    version: str = "1.0", source_label: str | None = None) -> dict[str, bytes]:
    model_config = yaml.safe_load(Path(model_config_path).read_text()) or {}
    entries = cluster_properties(model_config, model_name=model_name, target=target, mar_name=mar_name, version=version)
    label = source_label or str(model_config_path)
    return {
        CONFIG_NAME: render_properties(entries, target, label).encode(),
        METRICS_NAME: METRICS_YAML.read_bytes(),
    }


def stale_files(out: Path, files: Mapping[str, bytes]) -> list[str]:
    return [name for name, content in files.items()
            if not (out / name).is_file() or (out / name).read_bytes() != content]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.kserve_config", description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", type=Path, required=True, help="the model's model-config.yaml")
    parser.add_argument("--model-name", required=True, help="TorchServe model name (the URL's model)")
    parser.add_argument("--mar", help="archive file name in the model store (default: MODEL_NAME.mar)")
    parser.add_argument("--version", default="1.0", help="the archive's model version (default: %(default)s)")
    parser.add_argument("--target", choices=TARGETS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="directory for config.properties and metrics.yaml")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files in --out differ")
    args = parser.parse_args(argv)
    try:
        label = args.model_config.resolve().relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        label = str(args.model_config)
    try:
        files = generated_files(args.model_config, model_name=args.model_name, target=args.target,
                                mar_name=args.mar, version=args.version, source_label=label)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        stale = stale_files(args.out, files)
        for name in stale:
            print(f"stale: {args.out / name} (regenerate with the same command without --check)", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (args.out / name).write_bytes(content)
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
