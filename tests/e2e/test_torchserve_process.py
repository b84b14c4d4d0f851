"""Real TorchServe servers around the tiny model and the minimal handler.

Servers are expensive (a JVM plus a Python worker importing torch), so one plain server serves the
whole session and one token-auth server this module; the stop and CLI tests start their own
because they end them. Every server is stopped in fixture teardown, also when a test fails.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

from tools.archive import archive_own_model, main as archive_main, read_archived_model_config
from tools.http_client import http_request
from tools.ports import free_ports, port_is_free
from tools.torchserve import ServerAddresses, TorchServeError, TorchServeProcess, pid_is_alive
from support.paths import REPO_ROOT

TINY_MODEL_FILE = REPO_ROOT / "tests" / "fixtures" / "tiny_cnn.py"
MINIMAL_HANDLER = REPO_ROOT / "benchmarks" / "handlers" / "minimal_handler.py"
CLASS_NAMES = ["circle", "square", "triangle"]
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
PNG = {"Content-Type": "image/png"}


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"test_loaded_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_bytes(seed: int, size: tuple[int, int] = (45, 37)) -> bytes:
    """A noisy PNG whose size differs from the model's input, so the resize is exercised."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=generator)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy(), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """The tiny CNN with seeded random weights, and its state dict file."""
    torch.manual_seed(0)
    model = load_module(TINY_MODEL_FILE).TinyCNN().eval()
    state_dict_file = tmp_path_factory.mktemp("tiny_sources") / "tiny.pt"
    torch.save(model.state_dict(), state_dict_file)
    return model, state_dict_file


@pytest.fixture(scope="session")
def model_store(tiny_model, tmp_path_factory) -> Path:
    _, state_dict_file = tiny_model
    names_file = state_dict_file.with_name("index_to_name.json")
    names_file.write_text(json.dumps({str(index): name for index, name in enumerate(CLASS_NAMES)}))
    store = tmp_path_factory.mktemp("model_store")
    archive_own_model(
        "tiny",
        model_file=TINY_MODEL_FILE,
        serialized_file=state_dict_file,
        class_names=names_file,
        input_size=32,
        mean=MEAN,
        std=STD,
        handler=MINIMAL_HANDLER,
        export_path=store,
    )
    return store


@pytest.fixture(scope="session")
def server(model_store, tmp_path_factory):
    with TorchServeProcess(model_store, ["tiny=tiny.mar"], tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture(scope="module")
def token_server(model_store, tmp_path_factory):
    with TorchServeProcess(model_store, ["tiny=tiny.mar"], tmp_path_factory.mktemp("token"), token_auth=True) as running:
        yield running


def expected_prediction(model: torch.nn.Module, image: bytes) -> tuple[int, float]:
    handler = load_module(MINIMAL_HANDLER)
    with torch.inference_mode():
        probabilities = torch.softmax(model(handler.image_to_tensor(image, (32, 32), MEAN, STD)[None]), dim=1)[0]
    return int(probabilities.argmax()), float(probabilities.max())


def test_prediction_equals_in_process_forward(server, tiny_model):
    model, _ = tiny_model
    image = png_bytes(seed=1)

    reply = server.request("POST", "/predictions/tiny", image, PNG)

    assert reply.status == 200, reply.text
    index, score = expected_prediction(model, image)
    assert reply.json()["index"] == index
    assert reply.json()["label"] == CLASS_NAMES[index]
    assert reply.json()["score"] == pytest.approx(score, abs=1e-5)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, tiny_model):
    model, _ = tiny_model
    images = [png_bytes(seed) for seed in range(8)]
    description = server.describe_model("tiny")
    assert (description["batchSize"], description["maxBatchDelay"]) == (4, 50)  # from model-config.yaml

    with ThreadPoolExecutor(max_workers=len(images)) as pool:
        replies = list(pool.map(lambda image: server.request("POST", "/predictions/tiny", image, PNG), images))

    for image, reply in zip(images, replies):
        index, score = expected_prediction(model, image)
        assert (reply.status, reply.json()["index"]) == (200, index)
        assert reply.json()["score"] == pytest.approx(score, abs=1e-5)


def test_undecodable_image_fails_alone(server):
    reply = server.request("POST", "/predictions/tiny", b"not an image", PNG)

    assert reply.status == 400
    assert reply.json()["error"]["code"] == "invalid_image"
    assert server.request("POST", "/predictions/tiny", png_bytes(seed=2), PNG).status == 200


def test_server_files_stay_in_its_run_dir(server):
    assert server.worker_pids(), "no worker process found"
    assert server.frontend_pid() in server.process_pids()
    assert sorted(path.name for path in server.temp_dir.glob(".ts.sock.*")) == [".ts.sock.9000"]
    assert (server.log_dir / "ts_log.log").exists()
    assert not (server.run_dir / "key_file.json").exists()  # token auth off: no key file


def test_two_servers_side_by_side_both_answer(server, token_server):
    assert server.inference_url != token_server.inference_url
    assert server.temp_dir != token_server.temp_dir
    image = png_bytes(seed=3)

    replies = [running.request("POST", "/predictions/tiny", image, PNG) for running in (server, token_server)]

    assert [reply.status for reply in replies] == [200, 200]
    assert replies[0].json() == replies[1].json()
    # Same worker port number in both, yet no clash: each socket lives in its own temp dir.
    assert (token_server.temp_dir / ".ts.sock.9000").exists() and (server.temp_dir / ".ts.sock.9000").exists()


def test_token_auth_rejects_missing_or_wrong_token(token_server):
    url = token_server.url("/predictions/tiny")
    image = png_bytes(seed=4)

    missing = http_request(url, "POST", image, PNG)
    wrong = http_request(url, "POST", image, {**PNG, "Authorization": "Bearer not-the-key"})
    management_key = http_request(url, "POST", image, {**PNG, **token_server.auth_headers("management")})
    inference_key = http_request(url, "POST", image, {**PNG, **token_server.auth_headers("inference")})

    # TorchServe 0.12 answers a failed token check with 400 InvalidKeyException, not 401.
    for rejected in (missing, wrong, management_key):
        assert rejected.status == 400
        assert rejected.json()["type"] == "InvalidKeyException"
    assert inference_key.status == 200
    assert inference_key.json()["label"] in CLASS_NAMES


def test_token_file_holds_per_api_keys(token_server):
    keys = json.loads(token_server.key_file.read_text())

    assert token_server.key_file.parent == token_server.run_dir
    assert {"inference", "management", "API"} <= keys.keys()
    assert keys["inference"]["key"] == token_server.inference_token
    assert "expiration time" in keys["inference"]
    assert oct(token_server.key_file.stat().st_mode & 0o777) == oct(0o600)


def test_stop_leaves_no_process_and_frees_ports(model_store, tmp_path):
    running = TorchServeProcess(model_store, ["tiny=tiny.mar"], tmp_path / "run", token_auth=True)
    with running:
        pids = running.process_pids()
        workers = running.worker_pids()
        group = running.pid
        assert running.key_file.exists()
    assert len(pids) >= 3 and set(workers) <= set(pids)  # launcher, java frontend, worker(s)

    assert [pid for pid in pids if pid_is_alive(pid)] == []
    assert group_members(group) == []
    for address in running.addresses.as_dict().values():
        assert port_is_free(int(address.rsplit(":", 1)[1]))
    assert not running.key_file.exists()


def group_members(group_id: int) -> list[int]:
    """Live (non-zombie) processes in the process group or session, as ps sees them."""
    listing = subprocess.run(["ps", "-e", "-o", "pid=,pgid=,sid=,stat="], capture_output=True, text=True, check=True)
    members = []
    for pid, pgid, sid, stat in (line.split() for line in listing.stdout.splitlines()):
        if group_id in (int(pgid), int(sid)) and not stat.startswith("Z"):
            members.append(int(pid))
    return members


def test_busy_port_is_refused_before_starting(model_store, tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        management, metrics = free_ports(2)
        server = TorchServeProcess(
            model_store, ["tiny=tiny.mar"], tmp_path, addresses=ServerAddresses.on_loopback(busy, management, metrics)
        )
        with pytest.raises(TorchServeError, match="already in use"):
            server.start()
    assert server.pid is None


def test_unknown_model_fails_fast_with_the_log(model_store, tmp_path):
    started = time.monotonic()
    with pytest.raises(TorchServeError) as failure:
        TorchServeProcess(model_store, ["ghost=ghost.mar"], tmp_path, startup_timeout=60).start()
    assert "ghost" in str(failure.value) and "last lines of" in str(failure.value)
    assert time.monotonic() - started < 30


def test_serve_cli_runs_in_foreground_and_stops_everything_on_sigterm(model_store, tmp_path):
    inference, management, metrics = free_ports(3)
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{inference}",
        "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{management}",
        "TS_METRICS_ADDRESS": f"http://127.0.0.1:{metrics}",
    }
    command = [sys.executable, "-m", "tools.serve", "--model-store", str(model_store), "--models", "tiny=tiny.mar",
               "--config", str(REPO_ROOT / "deploy" / "torchserve" / "local.properties"), "--run-root", str(tmp_path), "--startup-timeout", "90"]  # fmt: skip
    cli = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = read_until(cli, "Ctrl-C", timeout=120)
        assert "Token authorization is OFF" in banner
        assert f"http://127.0.0.1:{inference}" in banner
        group = int((tmp_path / str(inference) / "torchserve.pid").read_text())
        reply = http_request(f"http://127.0.0.1:{inference}/predictions/tiny", "POST", png_bytes(seed=5), PNG)
        assert reply.status == 200
        metrics_text = http_request(f"http://127.0.0.1:{metrics}/metrics").text
        assert "ts_inference_requests_total" in metrics_text  # metrics_mode=prometheus from local.properties

        cli.send_signal(signal.SIGTERM)
        output, _ = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 0, output
    assert "TorchServe stopped." in output
    assert group_members(group) == []


def read_until(process: subprocess.Popen, marker: str, timeout: float) -> str:
    """Read the process's output up to the line holding marker (fail on exit or timeout)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError("marker not seen in output:\n" + "".join(seen))


def test_own_model_archive_holds_handler_section_and_normalised_class_names(tiny_model, tmp_path):
    _, state_dict_file = tiny_model
    names_file = tmp_path / "index_to_name.json"
    names_file.write_text(json.dumps({"1": "square", "0": "circle", "2": "triangle"}))
    arguments = ["--name", "mine", "--model-file", str(TINY_MODEL_FILE), "--serialized-file", str(state_dict_file),
                 "--handler", str(MINIMAL_HANDLER), "--class-names", str(names_file), "--input-size", "48", "64",
                 "--mean", *map(str, MEAN), "--std", *map(str, STD), "--export-path", str(tmp_path / "store")]  # fmt: skip

    assert archive_main(arguments) == 0

    mar = tmp_path / "store" / "mine.mar"
    config = read_archived_model_config(mar)
    assert config["handler"] == {
        "input_size": [48, 64], "mean": MEAN, "std": STD, "class_names": "class_names.json", "top_k": 3,
    }  # fmt: skip
    assert {key: config[key] for key in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers")} == {
        "batchSize": 4, "maxBatchDelay": 50, "minWorkers": 1, "maxWorkers": 1,
    }  # fmt: skip
    assert "responseTimeout" in config
    with zipfile.ZipFile(mar) as archive:
        assert json.loads(archive.read("class_names.json")) == CLASS_NAMES
        assert json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]["handler"] == "minimal_handler.py"


def test_if_stale_rebuilds_only_when_sources_or_options_change(tiny_model, tmp_path, capsys):
    _, state_dict_file = tiny_model
    names_file = tmp_path / "names.json"
    names_file.write_text(json.dumps(CLASS_NAMES))
    arguments = ["--name", "cached", "--model-file", str(TINY_MODEL_FILE), "--serialized-file", str(state_dict_file),
                 "--handler", str(MINIMAL_HANDLER), "--class-names", str(names_file), "--input-size", "32",
                 "--export-path", str(tmp_path), "--if-stale"]  # fmt: skip

    mar = tmp_path / "cached.mar"

    def built(*extra: str) -> bool:
        assert archive_main(arguments + list(extra)) == 0
        return "up to date" not in capsys.readouterr().out

    assert built()  # no archive yet
    assert not built()  # nothing changed
    os.utime(mar, (time.time() - 60,) * 2)  # every source is now newer than the archive
    assert built()
    assert not built()
    assert built("--top-k", "1")  # an option changed, no file did
