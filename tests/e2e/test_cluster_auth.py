"""Why token auth is off inside pods: two replicas of one model, each with TorchServe's token auth,
refuse each other's keys. Behind a Service or load balancer a client holding one replica's key is
refused whenever its request lands on another, so authentication moves to the edge
(deploy/kubernetes/oauth2-proxy, or the mesh under KServe)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tools.http_client import http_request
from tools.torchserve import TorchServeProcess
from tools.demo_server import LOCAL_CONFIG, build_store, shape_png

PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    store = build_store(tmp_path_factory.mktemp("store"))
    servers = [TorchServeProcess(store, {"shapes": "shapes.mar"}, tmp_path_factory.mktemp(f"replica{i}"),
                                 token_auth=True, config_template=LOCAL_CONFIG) for i in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(server.start) for server in servers]:
                future.result()
        yield servers
    finally:
        for server in servers:
            server.stop()


def predict(server, token):
    headers = {**PNG, **({"Authorization": f"Bearer {token}"} if token else {})}
    # http_request, not server.request: that one adds the server's own key.
    return http_request(server.url("/predictions/shapes"), "POST", shape_png("star"), headers)


def test_a_key_from_one_replica_is_refused_by_another(replicas):
    first, second = replicas
    assert first.inference_token and second.inference_token
    assert first.inference_token != second.inference_token  # each replica draws its own at start
    for own, other in ((first, second), (second, first)):
        accepted = predict(own, own.inference_token)
        assert accepted.status == 200 and accepted.json()["predictions"][0]["label"] == "star"
        refused = predict(other, own.inference_token)
        assert refused.status in (400, 401), refused.text  # TorchServe 0.12: 400 InvalidKeyException
        assert "predictions" not in refused.text
    assert predict(first, None).status in (400, 401)
