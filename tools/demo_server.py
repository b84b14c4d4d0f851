"""Real TorchServe servers around the demo model and the explainer handler (end-to-end tests, charts)."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from demo.shapes import draw_shape
from tools.archive import archive_model
from tools.demo_store import CONFIG_FILE, HANDLER_FILE, MODEL_FILE, build_demo_store, sanity_members
from tools.torchserve import TorchServeProcess

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_CONFIG = REPO_ROOT / "deploy" / "torchserve" / "local.properties"


def shape_png(name: str = "circle", size: int = 64, fmt: str = "PNG", **drawing) -> bytes:
    image, _ = draw_shape(name, size=size, **drawing)
    pixels = (np.clip(image.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def build_store(directory: Path) -> Path:
    """A model store holding shapes.mar (weights from the demo's training cache)."""
    mar = build_demo_store()
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(mar, directory / mar.name)
    return directory


def add_enveloped_model(store: Path, envelope: str) -> str:
    """shapes_<envelope>.mar: the demo model configured for TorchServe's KServe envelope."""
    name = f"shapes_{envelope}"
    config = yaml.safe_load(CONFIG_FILE.read_text())
    config["handler"]["envelope"] = envelope
    config["batchSize"] = 1  # TorchServe's KServe envelopes read request 0 of a batch only
    work = store / f".{name}"
    work.mkdir(exist_ok=True)
    config_file = work / "model-config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    from demo.model_cache import BUILD_DIR
    # The demo archive's sanity checks: same weights and options, so the handler need not measure them.
    checks = sanity_members(build_demo_store(), work / "sanity")
    archive_model(name, model_file=MODEL_FILE, serialized_file=BUILD_DIR / "allconv_state.pt", handler=HANDLER_FILE,
                  export_path=store, config_file=config_file, extra_files=[BUILD_DIR / "index_to_name.json", checks])
    return name


@contextmanager
def running_server(store: Path, run_dir: Path, models: dict[str, str], **config) -> Iterator[TorchServeProcess]:
    """A TorchServe with the local demo config on free loopback ports; stopped on exit, always."""
    properties = {key: str(value) for key, value in config.items()}
    with TorchServeProcess(store, models, run_dir, config_template=LOCAL_CONFIG, config=properties) as server:
        yield server


def post_json(server: TorchServeProcess, path: str, document: dict, headers: dict | None = None):
    return server.request("POST", path, json.dumps(document).encode(),
                          {"Content-Type": "application/json", **(headers or {})}, timeout=120)
