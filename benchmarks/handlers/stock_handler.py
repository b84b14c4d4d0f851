"""The stock TorchServe explanation pattern, as a baseline for the end-to-end benchmark.

What TorchServe's own image handlers and examples do: decode and resize the image, one no-grad
batched prediction, and on an explanation request (the /explanations route, which TorchServe marks
with the header ``explain: True``; or an ``X-Explain`` header) Captum's ``attribute()`` per method
for that request's row, each paying its own forward, returned as nested lists (``tolist()``).

Self-contained on purpose (TorchServe imports this file from the archive): it needs torch, PIL and
Captum only. Configuration, from the ``handler:`` section of model-config.yaml:

    handler:
      input_size: [64, 64]
      mean: [0.5, 0.5, 0.5]
      std: [0.25, 0.25, 0.25]
      class_names: index_to_name.json
      top_k: 3
      default_explainers: [guided_backprop, grad_cam]
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from captum.attr import Deconvolution, GuidedBackprop, GuidedGradCam, LayerGradCam, Saliency
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)
warnings.filterwarnings("ignore", module="captum")


def _load_model(model_file: Path, state_file: Path) -> nn.Module:
    spec = importlib.util.spec_from_file_location(f"stock_model_{model_file.stem}", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classes = [value for value in vars(module).values()
               if isinstance(value, type) and issubclass(value, nn.Module) and value.__module__ == module.__name__]
    model = classes[0]()
    model.load_state_dict(torch.load(state_file, map_location="cpu", weights_only=True))
    return model.eval()


def _class_names(spec, model_dir: Path) -> list[str]:
    if isinstance(spec, list):
        return [str(name) for name in spec]
    loaded = json.loads((model_dir / str(spec)).read_text())
    return [str(loaded[key]) for key in sorted(loaded, key=int)] if isinstance(loaded, dict) else [str(n) for n in loaded]


class StockCaptumHandler:
    def initialize(self, context) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        manifest = context.manifest["model"]
        self.model = _load_model(model_dir / manifest["modelFile"], model_dir / manifest["serializedFile"])
        settings = (context.model_yaml_config or {}).get("handler", {})
        self.input_size = tuple(settings.get("input_size", (224, 224)))
        self.mean = torch.tensor(settings.get("mean", [0.0, 0.0, 0.0])).view(-1, 1, 1)
        self.std = torch.tensor(settings.get("std", [1.0, 1.0, 1.0])).view(-1, 1, 1)
        self.class_names = _class_names(settings["class_names"], model_dir)
        self.top_k = int(settings.get("top_k", 3))
        self.default_explainers = list(settings.get("default_explainers", ["guided_backprop"]))
        self.layer = [module for module in self.model.modules() if isinstance(module, nn.Conv2d)][-1]
        self.initialized = True

    def preprocess(self, row) -> torch.Tensor:
        payload = row.get("data") if row.get("data") is not None else row.get("body")
        height, width = self.input_size
        with Image.open(io.BytesIO(payload)) as image:
            rgb = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(height, width, 3)
        return (pixels.permute(2, 0, 1).float() / 255.0 - self.mean) / self.std

    def explainers_for(self, index: int, context) -> list[str]:
        headers = context.get_all_request_header(index) or {}
        if str(headers.get("explain", "")).lower() == "true":
            return self.default_explainers
        asked = headers.get("X-Explain") or headers.get("x-explain")
        return [name.strip() for name in asked.split(",")] if asked else []

    def attribute(self, method: str, row: torch.Tensor, target: int):
        target = torch.tensor([target])
        if method == "saliency":
            return Saliency(self.model).attribute(row, target=target, abs=False)
        if method == "guided_backprop":
            return GuidedBackprop(self.model).attribute(row, target=target)
        if method == "deconvnet":
            return Deconvolution(self.model).attribute(row, target=target)
        if method == "grad_cam":
            cam = LayerGradCam(self.model, self.layer).attribute(row, target=target, relu_attributions=True)
            return F.interpolate(cam, size=row.shape[-2:], mode="bilinear", align_corners=False)
        if method == "guided_grad_cam":
            return GuidedGradCam(self.model, self.layer).attribute(row, target=target, interpolate_mode="bilinear")
        raise ValueError(f"unknown explainer {method}")

    def handle(self, data, context):
        batch = torch.stack([self.preprocess(row) for row in data])
        with torch.no_grad():
            probabilities = torch.softmax(self.model(batch), dim=1)
        scores, indices = probabilities.topk(self.top_k, dim=1)
        responses = []
        for index in range(len(data)):
            reply = {"predictions": [{"index": int(i), "label": self.class_names[int(i)], "score": float(s)}
                                     for s, i in zip(scores[index].tolist(), indices[index].tolist())]}
            methods = self.explainers_for(index, context)
            if methods:
                row = batch[index:index + 1].clone()
                target = int(indices[index, 0])
                reply["explanations"] = {method: self.attribute(method, row, target).detach()[0].tolist()
                                         for method in methods}
            responses.append(reply)
        return responses
