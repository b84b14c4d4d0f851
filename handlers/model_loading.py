"""Loading an eager image classifier from a model archive's files (model file + state dict)."""

from __future__ import annotations

import importlib.util
import inspect
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

from explainers.errors import UnsupportedModelError


def load_eager_model(model_file: Path, state_file: Path, device: torch.device) -> nn.Module:
    """The one ``nn.Module`` class defined in ``model_file``, built without arguments, with its weights.

    Raises:
        UnsupportedModelError: the file defines no or several module classes, or the weights are a
            TorchScript archive (hooks and our ReLU rules cannot run inside TorchScript).
    """
    if _is_torchscript(state_file):
        raise UnsupportedModelError(
            f"{state_file.name} is a TorchScript archive; explanations need an eager model: archive the "
            "model's Python file and its state dict instead")
    module_name = f"xai_model_{model_file.stem}"
    spec = importlib.util.spec_from_file_location(module_name, model_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    classes = [cls for _, cls in inspect.getmembers(module, inspect.isclass)
               if issubclass(cls, nn.Module) and cls.__module__ == module_name]
    if len(classes) != 1:
        raise UnsupportedModelError(
            f"{model_file.name} must define exactly one nn.Module class, found {[c.__name__ for c in classes]}")
    model = classes[0]()
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
