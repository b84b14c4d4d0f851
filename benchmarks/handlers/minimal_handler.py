"""Predict-only TorchServe handler: the baseline for benchmarks and the model behind serving tests.

It does the least a real image endpoint does (decode, resize, one batched forward, top-1), so that
what the project's explaining handler adds on top can be measured against it. Configuration comes
from the `handler:` section of the archive's model-config.yaml:

    handler:
      input_size: [32, 32]          # [height, width]
      mean: [0.5, 0.5, 0.5]         # optional; no normalisation when absent
      std: [0.25, 0.25, 0.25]       # optional
      class_names: class_names.json # optional; a file in the archive or an inline list

TorchServe finds the entry point by importing this file and taking its only class, so the helpers
stay module-level functions (and none is called `handle`, which TorchServe would take instead).
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_INPUT_SIZE = (224, 224)


def image_to_tensor(
    image_bytes: bytes | bytearray,
    input_size: tuple[int, int],
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> torch.Tensor:
    """Encoded image -> float tensor [3, H, W] in [0, 1], optionally normalised per channel."""
    height, width = input_size
    with Image.open(io.BytesIO(image_bytes)) as image:
        rgb = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(height, width, 3)
    tensor = pixels.permute(2, 0, 1).to(torch.float32) / 255.0
    if mean is not None and std is not None:
        tensor = (tensor - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    return tensor


def read_class_names(spec: Any, model_dir: Path) -> list[str] | None:
    """Class names from an inline list, or a JSON file holding a list or {"0": "name", ...}."""
    if spec is None:
        return None
    if isinstance(spec, list):
        return [str(name) for name in spec]
    loaded = json.loads((model_dir / str(spec)).read_text())
    if isinstance(loaded, dict):
        return [str(loaded[key]) for key in sorted(loaded, key=int)]
    return [str(name) for name in loaded]


def load_eager_model(model_file: Path, state_dict_file: Path) -> nn.Module:
    """Instantiate the one nn.Module class defined in model_file and load its weights."""
    spec = importlib.util.spec_from_file_location(f"served_model_{model_file.stem}", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model_classes = [
        value
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, nn.Module) and value.__module__ == module.__name__
    ]
    if len(model_classes) != 1:
        raise ValueError(f"{model_file.name} must define exactly one nn.Module class, found {model_classes}")
    model = model_classes[0]()
    model.load_state_dict(torch.load(state_dict_file, map_location="cpu", weights_only=True))
    return model.eval()


def request_payload(row: dict[str, Any]) -> bytes | bytearray:
    """Raw body (`body`) or multipart field `data`: TorchServe puts the bytes under either key."""
    payload = row.get("data") if row.get("data") is not None else row.get("body")
    if not isinstance(payload, (bytes, bytearray)):
        raise ValueError("expected raw image bytes in the request body or a multipart field 'data'")
    return payload


class MinimalImageClassifier:
    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.input_size = DEFAULT_INPUT_SIZE
        self.mean: list[float] | None = None
        self.std: list[float] | None = None
        self.class_names: list[str] | None = None

    def initialize(self, context) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        model_entry = context.manifest["model"]
        self.model = load_eager_model(model_dir / model_entry["modelFile"], model_dir / model_entry["serializedFile"])
        settings = (context.model_yaml_config or {}).get("handler", {}) or {}
        self.input_size = tuple(settings.get("input_size", DEFAULT_INPUT_SIZE))
        self.mean, self.std = settings.get("mean"), settings.get("std")
        self.class_names = read_class_names(settings.get("class_names"), model_dir)
        logger.info("minimal handler ready: input %s, %s classes", self.input_size, len(self.class_names or []))

    def handle(self, data: list[dict[str, Any]], context) -> list[dict[str, Any]]:
        responses: list[dict[str, Any] | None] = [None] * len(data)
        tensors, decoded_rows = [], []
        for row_index, row in enumerate(data):
            try:
                tensors.append(image_to_tensor(request_payload(row), self.input_size, self.mean, self.std))
                decoded_rows.append(row_index)
            except (ValueError, UnidentifiedImageError, OSError) as error:
                # Only this request fails; the rest of the batch is still answered.
                context.set_response_status(400, "Bad Request", row_index)
                responses[row_index] = {"error": {"code": "invalid_image", "message": str(error)}}
        if tensors:
            with torch.inference_mode():
                probabilities = torch.softmax(self.model(torch.stack(tensors)), dim=1)
            scores, indices = probabilities.max(dim=1)
            for row_index, index, score in zip(decoded_rows, indices.tolist(), scores.tolist()):
                responses[row_index] = {"index": index, "label": self.label(index), "score": score}
        return responses

    def label(self, index: int) -> str:
        if self.class_names is not None and index < len(self.class_names):
            return self.class_names[index]
        return str(index)
