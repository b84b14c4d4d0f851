"""deploy/torchserve/production.properties: its choices, and a real server started with it.

TorchServeProcess owns the addresses, model store and startup models (it picks free loopback
ports), so the live test takes every other entry of the production file as is, with token
authorization on, as the production file asks.
"""

from __future__ import annotations

import http.client
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tools.http_client import http_request
from tools.torchserve import MANAGED_KEYS, TorchServeProcess, read_properties
from tools.demo_server import build_store, shape_png
from support.paths import REPO_ROOT

PRODUCTION = REPO_ROOT / "deploy" / "torchserve" / "production.properties"
SETTINGS = read_properties(PRODUCTION)
PNG = {"Content-Type": "image/png"}


def test_production_choices():
    assert SETTINGS["disable_token_authorization"] == "false"
    assert int(SETTINGS["token_expiration_min"]) == 60
    assert SETTINGS["enable_model_api"] == "false"
    assert SETTINGS["enable_envvars_config"] == "false"
    assert SETTINGS["install_py_dep_per_model"] == "false"
    for key in ("inference_address", "management_address", "metrics_address"):
        assert urlsplit(SETTINGS[key]).hostname == "127.0.0.1", key  # the operator opens what they choose
    for key in ("grpc_inference_address", "grpc_management_address"):
        assert SETTINGS[key] == "127.0.0.1"
    ports = {urlsplit(SETTINGS[key]).port for key in ("inference_address", "management_address", "metrics_address")}
    assert len(ports) == 3, "metrics and management each on their own address"
    assert int(SETTINGS["max_request_size"]) == 8 * 2**20
    assert int(SETTINGS["max_response_size"]) == 16 * 2**20
    store = SETTINGS["model_store"]
    pattern = re.compile(SETTINGS["allowed_urls"])
    assert pattern.fullmatch(f"file://{store}/shapes.mar")
    for url in (f"file://{store}/../etc/x.mar", f"file://{store}/sub/x.mar", "https://example.com/x.mar",
                "file:///tmp/x.mar", f"file://{store}/x.mar.evil"):
        assert not pattern.fullmatch(url), url


def test_no_browser_origin_is_allowed():
    # The viewer is a local-demo tool: no web page may read production answers from a browser.
    cors = {key: value for key, value in SETTINGS.items() if key.startswith("cors_")}
    assert all(not value.strip() for value in cors.values()), cors


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    entries = {key: value for key, value in SETTINGS.items() if key not in MANAGED_KEYS}
    entries["metrics_config"] = str(PRODUCTION.parent / entries["metrics_config"])
    store = build_store(tmp_path_factory.mktemp("store"))
    with TorchServeProcess(store, {"shapes": "shapes.mar"}, tmp_path_factory.mktemp("run"),
                           token_auth=True, config=entries) as server:
        yield server


def _post(server, headers, body=None):
    return http_request(server.url("/predictions/shapes"), "POST", body or shape_png(), {**PNG, **headers}, timeout=30)


def test_a_request_without_the_token_is_rejected_and_with_it_served(server):
    assert server.key_file.exists()  # key_file.json, in the server's working directory
    # TorchServe 0.12 answers a missing or wrong key with 400 InvalidKeyException (not 401).
    for headers in ({}, {"Authorization": "Bearer not-the-key"}, server.auth_headers("management")):
        reply = _post(server, headers)
        assert reply.status == 400, reply.text
        assert reply.json()["type"] == "InvalidKeyException"
    reply = _post(server, server.auth_headers("inference"))
    assert reply.status == 200 and reply.json()["predictions"][0]["label"] == "circle"
    cross_origin = _post(server, {**server.auth_headers("inference"), "Origin": "http://127.0.0.1:8090"})
    assert cross_origin.status == 200
    assert not {key.lower() for key in cross_origin.headers} & {"access-control-allow-origin"}


def test_model_api_is_off_and_management_needs_its_token(server):
    assert http_request(server.url("/models", "management"), "GET").status == 400  # no token
    assert server.request("GET", "/models/shapes", api="management").status == 200
    register = server.request("POST", "/models?url=shapes.mar&model_name=again", api="management")
    assert register.status == 405, register.text


def test_metrics_are_on_their_own_address_without_a_token(server):
    reply = http_request(server.url("/metrics", "metrics"), "GET")
    assert reply.status == 200 and "ts_inference_requests_total" in reply.text
    assert urlsplit(server.metrics_url).port != urlsplit(server.inference_url).port


def test_request_size_limit(server):
    limit = int(SETTINGS["max_request_size"])
    address = urlsplit(server.inference_url)

    def status_for(length: int, send_body: bool) -> int:
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        try:
            connection.putrequest("POST", "/predictions/shapes")
            for key, value in {**PNG, **server.auth_headers(), "Content-Length": str(length)}.items():
                connection.putheader(key, value)
            connection.endheaders()
            if send_body:
                connection.send(b"\0" * length)
            return connection.getresponse().status
        finally:
            connection.close()

    # Over the limit, the frontend answers 413 from the headers alone and never reads the body.
    assert status_for(limit + 1, send_body=False) == 413
    assert status_for(limit - 1024, send_body=True) == 400  # reaches the handler: not an image
