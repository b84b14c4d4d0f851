"""Fast checks of tools' pure parts (no server started here)."""

from __future__ import annotations

import json
import socket

import pytest

from serving.class_names import load_class_names
from tools.archive import model_config, normalise_input_size
from tools.ports import free_ports, port_is_free
from tools.serve import addresses_from_environment
from tools.torchserve import ServerAddresses, TorchServeProcess, parse_model_specs, read_properties


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(5)
    assert len(set(ports)) == 5
    assert all(port_is_free(port) for port in ports)


def test_a_listening_port_is_not_free():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert not port_is_free(listener.getsockname()[1])


def test_model_specs_accept_pairs_bare_archives_and_mappings():
    assert parse_model_specs(["shapes=shapes.mar", "other.mar"]) == {"shapes": "shapes.mar", "other": "other.mar"}
    assert parse_model_specs({"a": "b.mar"}) == {"a": "b.mar"}
    with pytest.raises(ValueError):
        parse_model_specs(["=x.mar"])


def test_properties_reader_skips_comments_and_keeps_equals_in_values(tmp_path):
    path = tmp_path / "x.properties"
    path.write_text("# comment\n! also\n\nmetrics_mode = prometheus\nvmargs=-Da=b\n")
    assert read_properties(path) == {"metrics_mode": "prometheus", "vmargs": "-Da=b"}


def test_config_may_not_set_keys_the_process_manages(tmp_path):
    with pytest.raises(ValueError, match="inference_address"):
        TorchServeProcess(tmp_path, ["a=a.mar"], tmp_path, config={"inference_address": "http://0.0.0.0:80"})


def test_config_file_holds_addresses_models_and_token_setting(tmp_path):
    addresses = ServerAddresses.on_loopback(1, 2, 3)
    process = TorchServeProcess(tmp_path, ["a=a.mar"], tmp_path / "run", addresses=addresses, config={"metrics_mode": "prometheus"})
    process._prepare_run_dir()

    written = read_properties(process.config_path)

    assert written["inference_address"] == "http://127.0.0.1:1"
    assert written["load_models"] == "a=a.mar"
    assert written["disable_token_authorization"] == "true"
    assert written["metrics_mode"] == "prometheus"
    assert written["grpc_inference_port"] != written["grpc_management_port"]


def test_addresses_default_to_8080_and_follow_the_environment():
    assert addresses_from_environment({}) == ServerAddresses.on_loopback(8080, 8081, 8082)
    chosen = addresses_from_environment({"TS_INFERENCE_ADDRESS": "http://127.0.0.1:9080/", "TS_METRICS_ADDRESS": "http://127.0.0.1:9082"})
    assert chosen == ServerAddresses("http://127.0.0.1:9080", "http://127.0.0.1:8081", "http://127.0.0.1:9082")
    with pytest.raises(ValueError, match="TS_MANAGEMENT_ADDRESS"):
        addresses_from_environment({"TS_MANAGEMENT_ADDRESS": "127.0.0.1"})


@pytest.mark.parametrize(
    "content, names",
    [
        (["cat", "dog"], ["cat", "dog"]),
        ({"1": "dog", "0": "cat"}, ["cat", "dog"]),
        ({"0": ["n02123045", "tabby"], "1": ["n02099601", "golden_retriever"]}, ["tabby", "golden_retriever"]),
    ],
)
def test_class_names_come_as_list_or_index_to_name(tmp_path, content, names):
    path = tmp_path / "names.json"
    path.write_text(json.dumps(content))
    assert load_class_names(path) == names


@pytest.mark.parametrize("content", [{"0": "cat", "2": "dog"}, {"a": "cat"}, [], "cat"])
def test_malformed_class_names_are_rejected(tmp_path, content):
    path = tmp_path / "names.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError):
        load_class_names(path)


def test_input_size_and_normalisation_are_validated():
    assert normalise_input_size(224) == (224, 224)
    assert normalise_input_size([64, 48]) == (64, 48)
    for bad in ([1, 2, 3], [0, 5]):
        with pytest.raises(ValueError):
            normalise_input_size(bad)
    with pytest.raises(ValueError):
        model_config(input_size=32, class_names=["a"], mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError):
        model_config(input_size=32, class_names=["a"], mean=[0.5, 0.5], std=[1.0, 1.0])
    with pytest.raises(ValueError):
        model_config(input_size=32, class_names=["a"], mean=[0.5], std=[0.0])
