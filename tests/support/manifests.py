"""The deploy/ manifests as Python data: rendered kustomizations, schemas, and what pods run.

Core kinds are checked with the kubernetes-validate package's Python API (its command line only
warns about an apiVersion it has no schema for); KServe and KEDA kinds against the CRDs copied
into deploy/schemas/, made strict: an unknown field is an error, as a cluster's structural schema
pruning would otherwise drop it silently.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from tools.torchserve import read_properties

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas"
KUBERNETES = DEPLOY / "kubernetes"
KSERVE = DEPLOY / "kserve"
# The oldest Kubernetes KServe's current releases support, and the newest schema we ship.
KUBERNETES_VERSIONS = ("1.30.0", "1.35.0")
CRD_FILES = (
    "serving.kserve.io_inferenceservices.yaml",
    "serving.kserve.io_servingruntimes.yaml",
    "serving.kserve.io_clusterservingruntimes.yaml",
    "keda.sh_scaledobjects.yaml",
)


def kustomization_dirs() -> list[Path]:
    return sorted(path.parent for path in DEPLOY.rglob("kustomization.yaml"))


def kubectl() -> str | None:
    return shutil.which("kubectl")


@lru_cache(maxsize=None)
def render(directory: Path) -> tuple[dict, ...]:
    """`kubectl kustomize DIR` as documents (a failing render raises with kubectl's message)."""
    result = subprocess.run([kubectl() or "kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def load_yaml(path: Path) -> list[dict]:
    # The InferenceService CRD is 2 MB: the C loader reads it in a second, the Python one in ~20.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(path.read_text(), Loader=loader) if doc]


def find(documents, kind: str, name: str | None = None) -> dict:
    matches = [doc for doc in documents if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]
    if len(matches) != 1:
        raise LookupError(f"expected one {kind} {name or ''}, found {len(matches)}")
    return matches[0]


# -- custom resources -----------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema as JSON Schema that refuses unknown fields."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: _strict(value) for key, value in schema.items()}
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        schema.pop("type", None)
    if (schema.get("type") == "object" and "properties" in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema):
        schema["additionalProperties"] = False
    return schema


@lru_cache(maxsize=None)
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict JSON Schema, for every served version of the copied CRDs."""
    schemas = {}
    for name in CRD_FILES:
        for document in load_yaml(SCHEMAS / name):
            if document.get("kind") != "CustomResourceDefinition":
                continue
            spec = document["spec"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                # metadata is the API server's ObjectMeta, not described by the CRD.
                schema.setdefault("properties", {})["metadata"] = {"type": "object"}
                schemas[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = _strict(schema)
    return schemas


def is_core(document: dict) -> bool:
    group = document["apiVersion"].rpartition("/")[0]
    return group == "" or "." not in group or group.endswith(".k8s.io")


def validate(document: dict) -> None:
    """Raise if the document does not validate against its pinned schema (or none is known)."""
    key = (document["apiVersion"], document["kind"])
    if is_core(document):
        for version in KUBERNETES_VERSIONS:
            # strict: unknown fields are errors; SchemaNotFoundError for an unknown apiVersion.
            kubernetes_validate.validate(document, version, strict=True)
        return
    schema = crd_schemas().get(key)
    if schema is None:
        raise LookupError(f"no schema for {key}: copy its CRD into deploy/schemas/")
    jsonschema.validate(document, schema, cls=jsonschema.Draft7Validator)


# -- what a pod runs ------------------------------------------------------------------------


# Java-properties files read the way TorchServe's launcher reads them (one reader for the project).
properties = read_properties


def port_of(address: str) -> int:
    match = re.search(r":(\d+)$", address)
    if not match:
        raise ValueError(f"no port in {address!r}")
    return int(match.group(1))


def container_named(pod_spec: dict, name: str) -> dict:
    return next(container for container in pod_spec["containers"] if container["name"] == name)


def prestop_sleep_seconds(container: dict) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])


def adapter_query(rule: dict, label_matchers: str, group_by: str) -> str:
    """A prometheus-adapter rule's metricsQuery as the adapter sends it for one set of pods."""
    series = rule["seriesQuery"].partition("{")[0].strip("'\" ")
    return (rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", label_matchers).replace("<<.GroupBy>>", group_by))
