"""Three Deployment pods (emulated, support/pod_emulation.py) behind a real haproxy (health checks on
/ping, retries with redispatch, buffered requests) and scraped by a real Prometheus. Under bounded
mixed load, one replica is SIGKILLed and another SIGTERMed: every request still gets a correct
answer, and the scrape shows both replicas gone."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from tools.http_client import http_request
from support import manifests as m
from support.haproxy_server import HaproxyServer, find_haproxy
from support.pod_emulation import EmulatedPod, LabelledPrometheus
from tools.prometheus import find_prometheus
from tools.demo_server import b64, build_store, shape_png

pytestmark = [
    pytest.mark.skipif(m.kubectl() is None, reason="kubectl (its kustomize) is needed to render deploy/"),
    pytest.mark.skipif(find_prometheus() is None, reason="prometheus not installed (bash deploy/install-system-deps.sh)"),
    pytest.mark.skipif(find_haproxy() is None, reason="haproxy not installed (bash deploy/install-system-deps.sh)"),
]

MODEL_CONFIG = m.REPO_ROOT / "model_store" / "shapes" / "model-config.yaml"
SHAPES = ("circle", "square", "triangle", "cross", "star")
REPLICAS = 3
CLIENTS = 4
LOAD_SECONDS = 16
REQUEST_LIMIT = 3000


@pytest.fixture
def replicas(tmp_path_factory):
    store = build_store(tmp_path_factory.mktemp("store"))
    config = yaml.safe_load(MODEL_CONFIG.read_text())
    deployment = m.find(m.render(m.KUBERNETES / "hpa"), "Deployment")
    container = m.container_named(deployment["spec"]["template"]["spec"], "torchserve")
    pods = [EmulatedPod(container, target="kubernetes", model_config=config, model_name="shapes",
                        archives=[store / "shapes.mar"], run_dir=tmp_path_factory.mktemp(f"r{i}")) for i in range(REPLICAS)]
    try:
        with ThreadPoolExecutor(REPLICAS) as pool:
            for future in [pool.submit(pod.start) for pod in pods]:
                future.result()
        yield pods
    finally:
        for pod in pods:
            pod.stop()


def test_replicas_survive_a_sigkill_and_a_sigterm_under_load(replicas):
    images = {shape: shape_png(shape) for shape in SHAPES}
    inference = [pod.inference_url.removeprefix("http://") for pod in replicas]
    labels = {pod.metrics_url.removeprefix("http://"): {"namespace": "default", "pod": f"torchserve-xai-r{i}"}
              for i, pod in enumerate(replicas)}
    results: list[tuple[str, int, bool, float, str]] = []  # kind, status, correct, seconds, replica
    lock = threading.Lock()
    deadline = time.monotonic() + LOAD_SECONDS

    def client(index: int) -> None:
        sent = 0
        while time.monotonic() < deadline:
            with lock:
                if len(results) >= REQUEST_LIMIT:
                    return
            shape = SHAPES[(index + sent) % len(SHAPES)]
            explained = sent % 4 == 3
            route = "explanations" if explained else "predictions"
            started = time.monotonic()
            try:
                reply = http_request(f"{balancer.url}/{route}/shapes", "POST", images[shape], {"Content-Type": "image/png"}, timeout=60)
                status, body, replica = reply.status, reply.body, {k.lower(): v for k, v in reply.headers.items()}.get("x-served-by", "?")
            except OSError as error:  # a lost request: the balancer closed on us
                status, body, replica = 0, str(error).encode(), "none"
            correct = False
            if status == 200:
                document = json.loads(body)
                correct = document["predictions"][0]["label"] == shape and (
                    not explained or set(document["explanations"]) == {"guided_backprop", "grad_cam"})
            with lock:
                results.append(("explained" if explained else "plain", status, correct, time.monotonic() - started, replica))
            sent += 1

    with LabelledPrometheus(labels) as prometheus, HaproxyServer(inference) as balancer:
        prometheus.wait_for_target_up()
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(client, index) for index in range(CLIENTS)]
            time.sleep(LOAD_SECONDS * 0.3)
            killed_at = len(results)
            replicas[0].signal(signal.SIGKILL)
            time.sleep(LOAD_SECONDS * 0.25)
            terminated_at = len(results)
            replicas[1].signal(signal.SIGTERM)
            for future in futures:
                future.result()
        gone = prometheus.wait_for('up{job="torchserve"} == 0', lambda r: len(r) == 2, timeout=20)
        up = prometheus.query('up{job="torchserve"} == 1')

    by_replica = Counter(replica for *_, replica in results)
    failures = [r for r in results if r[1] != 200 or not r[2]]
    latencies = sorted(seconds for _, _, _, seconds, _ in results)
    summary = (f"{len(results)} requests ({sum(r[0] == 'explained' for r in results)} explained), "
               f"{len(failures)} failed; SIGKILL r0 after {killed_at}, SIGTERM r1 after {terminated_at}; "
               f"by replica {dict(by_replica)}; latency p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, "
               f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms")
    print("\n" + summary)
    assert not failures, (summary, failures[:5])
    assert len(results) > 100 and killed_at > 10 and terminated_at > killed_at
    assert sorted(r["metric"]["pod"] for r in gone) == ["torchserve-xai-r0", "torchserve-xai-r1"]
    assert [r["metric"]["pod"] for r in up] == ["torchserve-xai-r2"]
    # Traffic went to all three before the kills, and only r2 can have answered at the end.
    assert set(by_replica) == {"r0", "r1", "r2"}
    assert results[-1][4] == "r2"
