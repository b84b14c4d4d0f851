"""The runtime image builds from a Debian root filesystem and answers from inside the container:
KServe v1 predict and explain through the OIP front server, /v2/health/ready and /metrics, as uid 1000, with the storage's model store
mounted at /mnt/models/model-store.

Slow (debootstrap about a minute, then pip installs torch and the wheel: several minutes on two
cores) and needs root, podman and a Debian mirror, so it runs only when asked:
    .venv/bin/python -m pytest -m image tests/e2e/test_image.py
XAI_IMAGE_ROOTFS=DIR reuses a root filesystem made earlier (see deploy/container/build-image.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tools.http_client import http_request
from tools.ports import free_ports
from tools.demo_server import b64, build_store, shape_png

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed (bash deploy/install-system-deps.sh image)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap and rootful podman need root"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
ROOTFS_PACKAGES = "python3,python3-venv,openjdk-17-jre-headless,tini,ca-certificates"


def rootfs(tmp_path: Path) -> Path:
    if os.environ.get("XAI_IMAGE_ROOTFS"):
        return Path(os.environ["XAI_IMAGE_ROOTFS"])
    target = tmp_path / "rootfs"
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={ROOTFS_PACKAGES}", "bookworm", str(target),
                    "http://deb.debian.org/debian"], check=True, capture_output=True, timeout=900)
    return target


def test_image_builds_and_serves_from_the_container(tmp_path):
    tag = f"localhost/torchserve-xai:test-{uuid.uuid4().hex[:8]}"
    name = f"xai-image-test-{uuid.uuid4().hex[:8]}"
    environment = {**os.environ, "IMAGE": tag, "PY": str(REPO_ROOT / ".venv" / "bin" / "python")}
    if Path("/opt/wheels").is_dir():  # this project's machines keep the torch wheel there
        environment.update(PIP_FIND_LINKS="/opt/wheels", TORCH_INDEX="")
    if os.environ.get("PIP_CERT"):  # a TLS-inspecting proxy's CA, as this project's machines have
        environment["PIP_CERT"] = os.environ["PIP_CERT"]
    store = build_store(tmp_path / "store")
    store.chmod(0o755)
    started = time.monotonic()
    try:
        built = subprocess.run(["bash", "deploy/container/build-image.sh", "--rootfs", str(rootfs(tmp_path))],
                               cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=1800)
        assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
        build_seconds = time.monotonic() - started
        size = int(subprocess.run([*PODMAN, "image", "inspect", "--format", "{{.Size}}", tag],
                                  capture_output=True, text=True, check=True).stdout)
        inference, metrics = free_ports(2)
        subprocess.run([*PODMAN, "run", "-d", "--name", name, "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096",
                        "-p", f"127.0.0.1:{inference}:8080", "-p", f"127.0.0.1:{metrics}:8082",
                        "-v", f"{store}:/mnt/models/model-store:ro", tag],
                       check=True, capture_output=True, text=True)
        base = f"http://127.0.0.1:{inference}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if http_request(base + "/v2/health/ready", timeout=2).status == 200:  # the front server
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, subprocess.run([*PODMAN, "logs", name], capture_output=True, text=True).stdout[-4000:]
            time.sleep(1)
        user = subprocess.run([*PODMAN, "exec", name, "id", "-u"], capture_output=True, text=True, check=True).stdout.strip()
        assert user == "1000"
        instances = json.dumps({"instances": [{"data": b64(shape_png("star"))}]}).encode()
        headers = {"Content-Type": "application/json"}
        predict = http_request(base + "/v1/models/shapes:predict", "POST", instances, headers, timeout=60)
        assert predict.status == 200, predict.text
        assert predict.json()["predictions"][0]["predictions"][0]["label"] == "star"
        explain = http_request(base + "/v1/models/shapes:explain", "POST", instances, headers, timeout=60)
        assert explain.status == 200 and "grad_cam" in explain.json()["explanations"][0]["explanations"]
        scrape = http_request(f"http://127.0.0.1:{metrics}/metrics")
        assert scrape.status == 200 and 'xai_requests_total{' in scrape.text
        print(f"\nimage {tag}: built in {build_seconds:.0f} s (rootfs included), {size / 1e6:.0f} MB")
    finally:
        subprocess.run([*PODMAN, "rm", "-f", "-t", "10", name], capture_output=True)
        subprocess.run([*PODMAN, "rmi", "-f", tag], capture_output=True)
