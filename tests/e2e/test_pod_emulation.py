"""The pods of deploy/ run as local processes: KServe v1 and v2 pods of our ServingRuntime (the
oip front server owning TorchServe) and a pod of the Kubernetes Deployment, each with exactly the
manifest's args, environment and working directory and the generated config
(support/pod_emulation.py says what is moved, and why). tests/e2e/test_oip_front.py drives a
KServe pod with real OIP clients.

Then a real Prometheus scrapes the three, labelled as kubernetes_sd would label them, and every
autoscaling query of deploy/ is evaluated under bounded load: each returns exactly one sample and
rises with load.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from tools.http_client import http_request
from support import manifests as m
from support.pod_emulation import EmulatedPod, LabelledPrometheus
from tools.prometheus import find_prometheus
from tools.demo_server import b64, build_store, shape_png

pytestmark = [
    pytest.mark.skipif(m.kubectl() is None, reason="kubectl (its kustomize) is needed to render deploy/"),
    pytest.mark.skipif(find_prometheus() is None, reason="prometheus not installed (bash deploy/install-system-deps.sh)"),
]

MODEL_CONFIG = m.REPO_ROOT / "model_store" / "shapes" / "model-config.yaml"
JSON = {"Content-Type": "application/json"}
PODS = {
    # name -> (pod label as kubernetes_sd gives it, target, KServe labels)
    "kserve-v1": ("shapes-v1-predictor-7d9f-abcde", "kserve", {"serviceEnvelope": "kserve"}),
    "kserve-v2": ("shapes-v2-predictor-5c8b-fghij", "kserve", {"serviceEnvelope": "kservev2"}),
    "deployment": ("torchserve-xai-6b7c8d-klmno", "kubernetes", {}),
}


def container_for(name: str) -> dict:
    if name == "deployment":
        deployment = m.find(m.render(m.KUBERNETES / "hpa"), "Deployment")
        return m.container_named(deployment["spec"]["template"]["spec"], "torchserve")
    (container,) = m.find(m.render(m.KSERVE), "ServingRuntime")["spec"]["containers"]
    return container


@pytest.fixture(scope="module")
def pods(tmp_path_factory):
    store = build_store(tmp_path_factory.mktemp("store"))
    config = yaml.safe_load(MODEL_CONFIG.read_text())
    started: dict[str, EmulatedPod] = {}
    try:
        def start(name):
            pod_label, target, labels = PODS[name]
            pod = EmulatedPod(container_for(name), target=target, model_config=config, model_name="shapes",
                              archives=[store / "shapes.mar"], run_dir=tmp_path_factory.mktemp(name), labels=labels)
            started[name] = pod  # registered before start so that a half-started pod is stopped too
            pod.start()
        # Started together: each spends most of its start in the JVM and the model load.
        with ThreadPoolExecutor(len(PODS)) as pool:
            for future in [pool.submit(start, name) for name in PODS]:
                future.result()
        yield started
    finally:
        for pod in started.values():
            pod.stop()


def v1(pod, verb, instances):
    return http_request(f"{pod.url}/v1/models/shapes:{verb}", "POST", json.dumps({"instances": instances}).encode(), JSON, timeout=60)


def v2(pod, verb, image, parameters=None):
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}
    document = {"id": "r", "inputs": [tensor], **({"parameters": parameters} if parameters else {})}
    return http_request(f"{pod.url}/v2/models/shapes/{verb}", "POST", json.dumps(document).encode(), JSON, timeout=60)


def test_pods_run_the_manifest_command_and_the_generated_config(pods):
    for name, pod in pods.items():
        command = pod.command()
        arguments = container_for(name)["args"]
        if pod.runs_front_server:
            ports = {f"--http-port={pod.front_http_port}", f"--grpc-port={pod.front_grpc_port}"}
            assert command[1:5] == ["-m", "oip", "--host", "127.0.0.1"]
            assert [a for a in command[5:] if a not in ports] == [pod.mapped(a) for a in arguments[1:] if "-port=" not in a]
        else:
            assert command[1:] == [pod.mapped(argument) for argument in arguments[1:]]
        committed = m.properties(m.KSERVE / "model-repository" / "config" / "config.properties" if PODS[name][1] == "kserve"
                                 else m.KUBERNETES / "base" / "config.properties")
        moved = {"inference_address", "management_address", "metrics_address", "grpc_inference_port",
                 "grpc_management_port", "model_store", "model_snapshot", "allowed_urls", "metrics_config"}
        assert {k: v for k, v in pod.config.items() if k not in moved} == {k: v for k, v in committed.items() if k not in moved}
        assert pod.config["model_snapshot"] == committed["model_snapshot"]  # same batching and workers


def test_kserve_v1_pod_predicts_and_explains(pods):
    pod = pods["kserve-v1"]
    image = b64(shape_png("triangle"))
    predict = v1(pod, "predict", [{"data": image}, {"data": b64(shape_png("star"))}])
    assert predict.status == 200, predict.text
    assert [p["predictions"][0]["label"] for p in predict.json()["predictions"]] == ["triangle", "star"]
    explain = v1(pod, "explain", [{"data": image}])
    assert explain.status == 200, explain.text
    (explained,) = explain.json()["explanations"]
    assert set(explained["explanations"]) == {"guided_backprop", "grad_cam"}


def test_kserve_v2_pod_predicts_and_explains(pods):
    pod = pods["kserve-v2"]
    image = b64(shape_png("cross"))
    predict = v2(pod, "infer", image)
    assert predict.status == 200, predict.text
    outputs = {output["name"]: output for output in predict.json()["outputs"]}
    assert outputs["labels"]["datatype"] == "BYTES" and outputs["labels"]["data"][0] == "cross"
    explain = v2(pod, "explain", image, {"encoding": "png"})  # PNGs: base64 text in JSON
    assert explain.status == 200, explain.text
    names = {output["name"] for output in explain.json()["outputs"]}
    assert names == {"scores", "labels", "indices", "explanation.guided_backprop", "explanation.grad_cam"}


def test_deployment_pod_serves_the_plain_routes_batched(pods):
    pod = pods["deployment"]
    predict = http_request(f"{pod.inference_url}/predictions/shapes", "POST", shape_png("square"), {"Content-Type": "image/png"})
    assert predict.status == 200 and predict.json()["predictions"][0]["label"] == "square"
    explain = http_request(f"{pod.inference_url}/explanations/shapes", "POST", shape_png("circle"), {"Content-Type": "image/png"})
    assert explain.status == 200 and set(explain.json()["explanations"]) == {"guided_backprop", "grad_cam"}
    described = http_request(f"{pod.management_url}/models/shapes").json()[0]
    assert described["batchSize"] == yaml.safe_load(MODEL_CONFIG.read_text())["batchSize"]


def test_every_pod_answers_ping_without_a_token_and_exports_our_metrics(pods):
    for name, pod in pods.items():
        ping = http_request(pod.inference_url + "/ping")
        assert ping.status == 200 and ping.json()["status"] == "Healthy", name
        metrics = http_request(pod.metrics_url + "/metrics")
        assert metrics.status == 200 and "xai_requests_total{" in metrics.text, name
        assert "ts_inference_requests_total{" in metrics.text or name == "deployment"


def test_kserve_pods_keep_the_models_batching_behind_the_front_server(pods):
    for name in ("kserve-v1", "kserve-v2"):
        described = http_request(f"{pods[name].management_url}/models/shapes").json()[0]
        assert described["batchSize"] == yaml.safe_load(MODEL_CONFIG.read_text())["batchSize"], name


# -- autoscaling queries --------------------------------------------------------------------


def autoscaling_queries() -> dict[str, str]:
    """Every query an autoscaler in deploy/ evaluates, with the adapter's template filled in as
    prometheus-adapter does for the Deployment's pods."""
    queries = {}
    deployment_pod = PODS["deployment"][0]
    for rule in yaml.safe_load((m.KUBERNETES / "prometheus-adapter" / "rules.yaml").read_text())["rules"]:
        queries[f"adapter:{rule['name']['as']}"] = m.adapter_query(rule, f'namespace="default",pod=~"{deployment_pod}"', "pod")
    for index, trigger in enumerate(m.find(m.render(m.KUBERNETES / "keda"), "ScaledObject")["spec"]["triggers"]):
        queries[f"keda:{index}"] = trigger["metadata"]["query"]
    for protocol in ("v1", "v2"):
        service = m.find(m.render(m.KSERVE), "InferenceService", f"shapes-{protocol}")
        for index, metric in enumerate(service["spec"]["predictor"]["autoScaling"]["metrics"]):
            queries[f"kserve-{protocol}:{index}"] = metric["external"]["metric"]["query"]
    return queries


def send_load(pods, clients_per_pod: int, seconds: float, limit: int = 2000) -> dict[str, int]:
    """Closed-loop clients per pod for `seconds` (at most `limit` requests in all): mostly plain
    predictions, every fifth explained. Returns counts by outcome."""
    images = {shape: b64(shape_png(shape)) for shape in ("circle", "square", "star")}
    deadline = time.monotonic() + seconds
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()

    def client(name, index):
        pod, sent = pods[name], 0
        while time.monotonic() < deadline:
            with lock:
                if counts["ok"] + counts["failed"] >= limit:
                    return
            image = images[("circle", "square", "star")[sent % 3]]
            verb = "explain" if sent % 5 == index % 5 else "predict"
            if name == "kserve-v1":
                reply = v1(pod, verb, [{"data": image}])
            elif name == "kserve-v2":
                reply = v2(pod, "explain" if verb == "explain" else "infer", image, {"encoding": "png"})
            else:
                route = "explanations" if verb == "explain" else "predictions"
                reply = http_request(f"{pod.inference_url}/{route}/shapes", "POST", json.dumps({"image": image}).encode(), JSON, timeout=60)
            with lock:
                counts["ok" if reply.status == 200 else "failed"] += 1
            sent += 1

    with ThreadPoolExecutor(len(pods) * clients_per_pod) as pool:
        futures = [pool.submit(client, name, index) for name in pods for index in range(clients_per_pod)]
        for future in futures:
            future.result()
    return counts


def evaluate(prometheus, queries) -> dict[str, list]:
    return {name: prometheus.query(query) for name, query in queries.items()}


def test_autoscaling_queries_return_one_sample_and_rise_with_load(pods):
    queries = autoscaling_queries()
    assert len(queries) == 4
    labels = {pod.metrics_url.removeprefix("http://"): {"namespace": "default", "pod": PODS[name][0]}
              for name, pod in pods.items()}
    with LabelledPrometheus(labels) as prometheus:
        prometheus.wait_for_target_up()
        idle = evaluate(prometheus, queries)
        for name in queries:
            if not name.startswith("adapter"):  # the adapter's series exists after the first request
                assert len(idle[name]) == 1, (name, idle[name])
        light = send_load(pods, clients_per_pod=1, seconds=12)
        time.sleep(2.5)  # two scrapes
        after_light = evaluate(prometheus, queries)
        heavy = send_load(pods, clients_per_pod=3, seconds=12)
        time.sleep(2.5)
        after_heavy = evaluate(prometheus, queries)
    assert light["failed"] == heavy["failed"] == 0, (light, heavy)
    figures = {}
    for name in queries:
        assert len(after_light[name]) == 1 and len(after_heavy[name]) == 1, (name, after_light[name], after_heavy[name])
        before = float(idle[name][0]["value"][1]) if idle[name] else 0.0
        values = before, float(after_light[name][0]["value"][1]), float(after_heavy[name][0]["value"][1])
        figures[name] = values
        assert values[0] < values[1] < values[2], (name, values)
    print(f"\nload: light {light}, heavy {heavy}; in-flight estimates (idle, 1 client, 3 clients): "
          + ", ".join(f"{name}={tuple(round(v, 2) for v in values)}" for name, values in figures.items()))
