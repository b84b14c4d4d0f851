"""Offline checks of deploy/kubernetes and deploy/kserve: schemas, renders, and cross-file facts.

No cluster here: every manifest is validated against pinned schemas (kubernetes-validate for core
kinds, the CRDs in deploy/schemas/ for KServe and KEDA), every kustomization must render, and
the facts that tie files together (ports, envelope, batch size, image tag, shutdown timing,
metric names) are checked where a cluster would only show them as a broken rollout.
"""

from __future__ import annotations

import copy
import json
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tools import kserve_config
from support import manifests as m

pytestmark = pytest.mark.skipif(m.kubectl() is None, reason="kubectl (its kustomize) is needed to render deploy/")

MODEL_CONFIG = m.REPO_ROOT / "model_store" / "shapes" / "model-config.yaml"
KUBERNETES_CONFIG = m.KUBERNETES / "base" / "config.properties"
KSERVE_CONFIG_DIR = m.KSERVE / "model-repository" / "config"
KSERVE_CONFIG = KSERVE_CONFIG_DIR / "config.properties"


def model_config() -> dict:
    return yaml.safe_load(MODEL_CONFIG.read_text())


def snapshot_entry(config: dict) -> dict:
    snapshot = yaml.safe_load(config["model_snapshot"])  # JSON is YAML
    (versions,) = snapshot["models"].values()
    (entry,) = versions.values()
    return entry


# -- schemas and renders --------------------------------------------------------------------


@pytest.mark.parametrize("directory", m.kustomization_dirs(), ids=lambda p: str(p.relative_to(m.DEPLOY)))
def test_every_kustomization_renders_and_validates(directory):
    documents = m.render(directory)
    assert documents, f"{directory} renders nothing"
    for document in documents:
        m.validate(document)


def test_the_kustomizations_cover_every_manifest():
    """A manifest no kustomization renders would never be validated (nor deployed)."""
    referenced = set()
    for directory in m.kustomization_dirs():
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        names = list(kustomization.get("resources", [])) + [p["path"] for p in kustomization.get("patches", [])]
        for generator in kustomization.get("configMapGenerator", []):
            names += [entry.partition("=")[2] or entry for entry in generator.get("files", [])]
        referenced |= {(directory / name).resolve() for name in names}
    files = [path for folder in (m.KUBERNETES, m.KSERVE) for path in folder.rglob("*.yaml")
             if path.name != "kustomization.yaml" and KSERVE_CONFIG_DIR not in path.parents]
    assert files and not sorted(str(p) for p in files if p.resolve() not in referenced)


def test_validation_refuses_unknown_fields_and_unknown_kinds():
    """The validators are strict: otherwise the tests above could pass on a misspelt field."""
    deployment = copy.deepcopy(m.find(m.render(m.KUBERNETES / "hpa"), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        m.validate(deployment)
    service = copy.deepcopy(m.find(m.render(m.KSERVE), "InferenceService", "shapes-v1"))
    service["spec"]["predictor"]["autoScaling"]["metrics"][0]["external"]["metric"]["querry"] = "up"
    with pytest.raises(jsonschema.ValidationError):
        m.validate(service)
    scaled = copy.deepcopy(m.find(m.render(m.KUBERNETES / "keda"), "ScaledObject"))
    scaled["spec"]["minReplicas"] = 1  # KEDA spells it minReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        m.validate(scaled)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        m.validate({"apiVersion": "autoscaling/v2beta1", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"}})
    with pytest.raises(LookupError):
        m.validate({"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "x"}})


# -- generated configs ----------------------------------------------------------------------


@pytest.mark.parametrize("target, directory", [("kserve", KSERVE_CONFIG_DIR), ("kubernetes", m.KUBERNETES / "base")])
def test_generated_configs_are_up_to_date(target, directory):
    files = kserve_config.generated_files(MODEL_CONFIG, model_name="shapes", target=target,
                                          source_label="model_store/shapes/model-config.yaml")
    assert kserve_config.stale_files(directory, files) == [], (
        f"regenerate: python -m tools.kserve_config --model-config model_store/shapes/model-config.yaml "
        f"--model-name shapes --target {target} --out {directory.relative_to(m.REPO_ROOT)}")


def test_the_packaged_metrics_config_is_the_deployed_one():
    assert kserve_config.METRICS_YAML.read_bytes() == (m.DEPLOY / "torchserve" / "metrics.yaml").read_bytes()


def test_kserve_config_puts_torchserve_on_loopback_behind_the_front_server_with_the_models_batching():
    config = m.properties(KSERVE_CONFIG)
    assert config["enable_envvars_config"] == "false"  # no TS_* variable can move it
    assert "service_envelope" not in config  # the front server speaks the protocols
    entry = snapshot_entry(config)
    for key in ("batchSize", "minWorkers", "maxWorkers", "maxBatchDelay", "responseTimeout"):
        assert entry[key] == model_config()[key], key
    for key in ("inference_address", "management_address"):
        assert config[key].startswith("http://127.0.0.1:"), key  # only the front server reaches it
        assert m.port_of(config[key]) not in (8080, 8081), key  # the front server's REST and gRPC ports
    assert config["disable_token_authorization"] == "true"
    assert config["metrics_mode"] == "prometheus"
    assert config["metrics_config"] == "/mnt/models/config/metrics.yaml"


def test_kubernetes_config_keeps_the_models_batching_and_reads_no_environment():
    config = m.properties(KUBERNETES_CONFIG)
    assert config["enable_envvars_config"] == "false"
    entry = snapshot_entry(config)
    for key in ("batchSize", "minWorkers", "maxWorkers", "maxBatchDelay", "responseTimeout"):
        assert entry[key] == model_config()[key], key
    assert config["disable_token_authorization"] == "true"


def test_the_generator_refuses_what_would_break_a_pod():
    config = model_config()
    config["handler"]["envelope"] = "kserve"
    for target in kserve_config.TARGETS:
        with pytest.raises(ValueError, match="envelope"):
            kserve_config.cluster_properties(config, model_name="shapes", target=target)
    config = model_config()
    config["minWorkers"], config["maxWorkers"] = 2, 1
    with pytest.raises(ValueError, match="workers"):
        kserve_config.cluster_properties(config, model_name="shapes", target="kubernetes")


def test_generator_cli_check_reports_stale_files(tmp_path, capsys):
    arguments = ["--model-config", str(MODEL_CONFIG), "--model-name", "shapes", "--target", "kserve", "--out", str(tmp_path)]
    assert kserve_config.main([*arguments, "--check"]) == 1
    assert kserve_config.main(arguments) == 0
    assert kserve_config.main([*arguments, "--check"]) == 0
    (tmp_path / "config.properties").write_text("inference_address=http://0.0.0.0:9999\n")
    assert kserve_config.main([*arguments, "--check"]) == 1
    assert "stale" in capsys.readouterr().err


# -- cross-file facts -----------------------------------------------------------------------


def deployment():
    return m.find(m.render(m.KUBERNETES / "hpa"), "Deployment", "torchserve-xai")


def serving_runtime():
    return m.find(m.render(m.KSERVE), "ServingRuntime", "torchserve-xai")


def test_ports_probes_and_scrape_annotations_match_the_configs():
    config = m.properties(KUBERNETES_CONFIG)
    inference, metrics = m.port_of(config["inference_address"]), m.port_of(config["metrics_address"])
    pod = deployment()["spec"]["template"]
    container = m.container_named(pod["spec"], "torchserve")
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": inference, "metrics": metrics}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(metrics)
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/ping", "port": "http"}, probe
    service = m.find(m.render(m.KUBERNETES / "hpa"), "Service")
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= set(ports)
    assert m.port_of(config["management_address"]) not in ports.values()
    assert config["management_address"].startswith("http://127.0.0.1:")

    kserve = m.properties(KSERVE_CONFIG)
    runtime = serving_runtime()
    (kserve_container,) = runtime["spec"]["containers"]
    assert kserve_container["name"] == "kserve-container"  # the name KServe merges the predictor into
    # The front server: REST first (KServe routes to the first port), gRPC named h2c.
    ports = [(port["containerPort"], port.get("name")) for port in kserve_container["ports"]]
    assert ports == [(8080, "http1"), (8081, "h2c")]
    assert {"--http-port=8080", "--grpc-port=8081"} <= set(kserve_container["args"])
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(m.port_of(kserve["metrics_address"]))
    assert kserve["metrics_address"] == "http://0.0.0.0:8082"
    assert kserve_container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert kserve_container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}


def test_the_runtime_runs_the_front_server_for_every_protocol_and_serves_both_services():
    runtime = serving_runtime()
    (container,) = runtime["spec"]["containers"]
    environment = {entry["name"]: entry.get("value") for entry in container["env"]}
    assert "TS_SERVICE_ENVELOPE" not in environment  # one front server answers v1, v2 and gRPC v2
    assert container["args"][0] == "torchserve-xai-oip"
    assert set(runtime["spec"]["protocolVersions"]) == {"v1", "v2", "grpc-v2"}
    formats = {entry["name"] for entry in runtime["spec"]["supportedModelFormats"]}
    for protocol in ("v1", "v2"):
        service = m.find(m.render(m.KSERVE), "InferenceService", f"shapes-{protocol}")
        model = service["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["protocolVersion"] == protocol and protocol in runtime["spec"]["protocolVersions"]
        assert model["modelFormat"]["name"] in formats
        annotations = service["metadata"]["annotations"]
        assert annotations["serving.kserve.io/autoscalerClass"] == "keda"
        assert annotations["serving.kserve.io/deploymentMode"] in ("Standard", "RawDeployment")


def test_the_deployment_and_the_runtime_run_the_same_storage_and_image():
    container = m.container_named(deployment()["spec"]["template"]["spec"], "torchserve")
    (runtime_container,) = serving_runtime()["spec"]["containers"]
    for arguments in (container["args"], runtime_container["args"]):
        assert "--model-store=/mnt/models/model-store" in arguments
        assert "--ts-config=/mnt/models/config/config.properties" in arguments
    assert "--foreground" in container["args"]  # otherwise the launcher exits and the pod with it
    # The image's default command is the runtime's (the front server owning TorchServe).
    containerfile = (m.DEPLOY / "container" / "Containerfile").read_text()
    command = json.loads(re.search(r"^CMD (\[.*\])$", containerfile, re.M).group(1))
    assert command == runtime_container["args"]
    makefile_image = re.search(r"^IMAGE := (\S+)$", (m.REPO_ROOT / "Makefile").read_text(), re.M).group(1)
    assert container["image"] == runtime_container["image"] == makefile_image
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert {"/mnt/models/config", "/mnt/models/model-store"} <= mounts
    for name in ("TEMP", "TMPDIR", "LOG_LOCATION"):
        value = next(entry["value"] for entry in container["env"] if entry["name"] == name)
        assert any(value == path or value.startswith(path + "/") for path in mounts), name  # writable volume


def test_termination_grace_covers_the_prestop_sleep_and_the_longest_request():
    response_timeout = model_config()["responseTimeout"]
    spec = deployment()["spec"]["template"]["spec"]
    sleep = m.prestop_sleep_seconds(m.container_named(spec, "torchserve"))
    assert spec["terminationGracePeriodSeconds"] >= sleep + response_timeout
    (runtime_container,) = serving_runtime()["spec"]["containers"]
    runtime_sleep = m.prestop_sleep_seconds(runtime_container)
    for protocol in ("v1", "v2"):
        predictor = m.find(m.render(m.KSERVE), "InferenceService", f"shapes-{protocol}")["spec"]["predictor"]
        assert predictor["terminationGracePeriodSeconds"] >= runtime_sleep + response_timeout


def test_autoscaling_reads_our_metrics_as_rates_with_one_sample():
    hpa = m.find(m.render(m.KUBERNETES / "hpa"), "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment()["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    rules = yaml.safe_load((m.KUBERNETES / "prometheus-adapter" / "rules.yaml").read_text())["rules"]
    assert metric["pods"]["metric"]["name"] in {rule["name"]["as"] for rule in rules}
    for query in autoscaling_queries().values():
        assert re.search(r"rate\(ts_\w+", query), query  # ts_* are counters
        assert not re.search(r"(?<!rate\()\bts_\w+\{", query), query
    for name, query in autoscaling_queries().items():
        if name.startswith(("keda", "kserve")):
            assert query.startswith("sum(") and query.endswith(" or vector(0)"), name


def autoscaling_queries() -> dict[str, str]:
    """Every Prometheus query an autoscaler in deploy/ evaluates, by where it is."""
    queries = {}
    for rule in yaml.safe_load((m.KUBERNETES / "prometheus-adapter" / "rules.yaml").read_text())["rules"]:
        queries[f"adapter:{rule['name']['as']}"] = m.adapter_query(rule, 'namespace="default",pod=~"torchserve-xai-.*"', "pod")
    scaled = m.find(m.render(m.KUBERNETES / "keda"), "ScaledObject")
    for index, trigger in enumerate(scaled["spec"]["triggers"]):
        queries[f"keda:{index}"] = trigger["metadata"]["query"]
    for protocol in ("v1", "v2"):
        service = m.find(m.render(m.KSERVE), "InferenceService", f"shapes-{protocol}")
        for index, metric in enumerate(service["spec"]["predictor"]["autoScaling"]["metrics"]):
            queries[f"kserve-{protocol}:{index}"] = metric["external"]["metric"]["query"]
    return queries


def test_auth_overlay_routes_clients_through_the_proxy_only():
    documents = m.render(m.KUBERNETES / "oauth2-proxy")
    pod = m.find(documents, "Deployment")["spec"]["template"]["spec"]
    proxy = m.container_named(pod, "oauth2-proxy")
    auth_port = next(port["containerPort"] for port in proxy["ports"] if port["name"] == "auth")
    assert "--upstream=http://127.0.0.1:8080" in proxy["args"]
    service = m.find(documents, "Service")
    http = next(port for port in service["spec"]["ports"] if port["name"] == "http")
    assert http["targetPort"] == "auth"
    policy = m.find(documents, "NetworkPolicy")
    open_ports = {port["port"] for rule in policy["spec"]["ingress"] for port in rule.get("ports", [])}
    assert open_ports == {auth_port, 8082}  # TorchServe's 8080 is not reachable from outside the pod
    assert m.properties(KUBERNETES_CONFIG)["disable_token_authorization"] == "true"
