"""Model archives and request helpers for the reliability tests (bad input, caps, faults).

One server holds three models, so the whole corpus costs one server start:

- ``shapes``: the demo model with its own model-config.yaml (the defaults users get);
- ``capped``: the demo model with every cost cap set low, to reach each cap cheaply;
- ``faulty``: the demo weights in ``tests/fixtures/faulty_model/faulty_shapes.py``, whose test
  explainers fail on demand (real MemoryError, torch allocator failure, simulated CUDA OOM).
"""

from __future__ import annotations

import io
import json
import time
import uuid
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from demo.model_cache import BUILD_DIR
from tools.archive import archive_model
from tools.demo_store import CONFIG_FILE, HANDLER_FILE, MODEL_FILE, build_demo_store, sanity_members
from tools.torchserve import TorchServeProcess

from .paths import FIXTURES

FAULTY_MODEL_FILE = FIXTURES / "faulty_model" / "faulty_shapes.py"

CAPS = {
    "max_image_pixels": 40_000,  # 200 x 200
    "max_explainers_per_request": 2,
    "max_explained_classes": 2,
    "max_integrated_gradients_steps": 16,
    "max_smoothgrad_samples": 8,
    "max_occlusion_evaluations": 65,  # 8 x 8 windows and the unoccluded forward
    "max_top_k": 2,
    "max_batch_per_forward": 8,
    "coarse_output": 8,
    "max_quality_steps": 4,
    "max_evaluations_per_explanation": 32,
    "max_frame_pixels": 2500,  # maps in the image's frame at most 50 x 50 here
}
CAPPED_HANDLER = {
    "allowed_explainers": ["saliency", "grad_cam", "integrated_gradients", "smoothgrad", "occlusion", "costly_probe"],
    "default_explainers": ["grad_cam"],
    "top_k": 2,
    "quality_steps": 4,
    "explainer_options": {
        "integrated_gradients": {"n_steps": 8, "internal_batch_size": 8},
        "smoothgrad": {"samples": 4, "noise": 0.15},
        "occlusion": {"window": 16, "stride": 8, "perturbations_per_eval": 8},  # 7 x 7 = 49 windows
    },
    "caps": CAPS,
}


def _archive(store: Path, name: str, config: dict, model_file: Path = MODEL_FILE) -> str:
    work = store / f".{name}"
    work.mkdir(parents=True, exist_ok=True)
    config_file = work / "model-config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    # The demo archive's sanity checks (same weights): only explainers checked with other options
    # than the demo's are measured when the model loads.
    checks = sanity_members(build_demo_store(), work / "sanity")
    archive_model(name, model_file=model_file, serialized_file=BUILD_DIR / "allconv_state.pt", handler=HANDLER_FILE,
                  export_path=store, config_file=config_file, extra_files=[BUILD_DIR / "index_to_name.json", checks])
    return f"{name}.mar"


def add_capped_model(store: Path) -> str:
    config = yaml.safe_load(CONFIG_FILE.read_text())
    handler = config["handler"]
    handler.pop("explainer_options", None)
    handler.update(CAPPED_HANDLER)
    # The faulty model file: the same network, plus costly_probe, a registered explainer to cap.
    return _archive(store, "capped", config, FAULTY_MODEL_FILE)


def add_faulty_model(store: Path) -> str:
    config = yaml.safe_load(CONFIG_FILE.read_text())
    return _archive(store, "faulty", config, FAULTY_MODEL_FILE)


# -- requests ------------------------------------------------------------------------------------


def image_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def multipart(fields: dict[str, tuple[bytes, str]]) -> tuple[bytes, dict]:
    """multipart/form-data of {name: (bytes, content type)}."""
    boundary = uuid.uuid4().hex
    body = b""
    for name, (data, content_type) in fields.items():
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.bin\"\r\n"
                 f"Content-Type: {content_type}\r\n\r\n").encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def json_body(document: object) -> tuple[bytes, dict]:
    return json.dumps(document).encode(), {"Content-Type": "application/json"}


def decompression_bomb_png(side: int = 40_000) -> bytes:
    """A 1-bit PNG of side x side black pixels: a few hundred kB claiming 1.6 G pixels."""
    return image_bytes(Image.new("1", (side, side)), "PNG", optimize=True)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header is patched to claim width x height."""
    data = bytearray(image_bytes(Image.new("RGB", (16, 16), (200, 30, 30)), "JPEG"))
    marker = data.find(b"\xff\xc0")  # baseline start-of-frame: length(2) precision(1) height(2) width(2)
    data[marker + 5: marker + 7] = height.to_bytes(2, "big")
    data[marker + 7: marker + 9] = width.to_bytes(2, "big")
    return bytes(data)


def worker_pid(server: TorchServeProcess, model: str) -> int:
    workers = server.describe_model(model)["workers"]
    assert len(workers) == 1, workers
    return int(workers[0]["pid"])


def wait_for_new_ready_worker(server: TorchServeProcess, model: str, old_pid: int, timeout: float = 90.0) -> int:
    """The pid of the model's replacement worker once it is READY and alive; fails at the timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        workers = server.describe_model(model)["workers"]
        last = [(w.get("pid"), w.get("status")) for w in workers]
        ready = [int(w["pid"]) for w in workers if w.get("status") == "READY" and int(w.get("pid") or -1) != old_pid]
        if ready and ready[0] in server.worker_pids():
            return ready[0]
        time.sleep(0.2)
    raise AssertionError(f"no new READY worker for {model} after {timeout} s; last seen {last}\n{server.log_tail()}")
