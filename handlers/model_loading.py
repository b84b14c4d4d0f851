"""Loading an eager image classifier from a model archive: a model file, or an architecture by name
(``torchvision:NAME``, ``timm:NAME``), and a state dict."""

from __future__ import annotations

import importlib.util
import inspect
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

from explainers.errors import UnsupportedModelError
from serving.settings import parse_architecture


def model_class(model_file: Path) -> type[nn.Module]:
    """The one ``nn.Module`` class ``model_file`` defines; importing it also runs whatever else the
    file does, such as registering explainers (load it before the settings that name them).

    Raises:
        UnsupportedModelError: the file defines no or several module classes.
    """
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
    return classes[0]


def load_eager_model(model_file: Path | type[nn.Module], state_file: Path, device: torch.device) -> nn.Module:
    """The model ``model_file`` defines (or that class itself), built without arguments, with its weights.

    Raises:
        UnsupportedModelError: the file defines no or several module classes, or the weights are a
            TorchScript archive (hooks and our activation rules cannot run inside TorchScript).
    """
    _refuse_torchscript(state_file)
    cls = model_file if isinstance(model_file, type) else model_class(model_file)
    return _with_weights(cls(), state_file, device)


def load_architecture(architecture: str, num_classes: int, state_file: Path, device: torch.device) -> nn.Module:
    """``torchvision:NAME`` or ``timm:NAME`` built without pretrained weights for ``num_classes``
    classes, then given the archive's state dict (nothing is downloaded).

    Raises:
        UnsupportedModelError: the library is missing or has no such model, the weights are
            TorchScript, or the state dict does not fit the architecture.
        InvalidOptionError: ``architecture`` is not of the form ``SOURCE:NAME``.
    """
    source, name = parse_architecture(architecture)
    _refuse_torchscript(state_file)
    try:
        if source == "torchvision":
            import torchvision

            if name not in torchvision.models.list_models(module=torchvision.models):
                raise UnsupportedModelError(
                    f"torchvision {torchvision.__version__} has no classification model {name!r}")
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        else:
            import timm

            if not timm.is_model(name):
                raise UnsupportedModelError(f"timm {timm.__version__} has no model {name!r}")
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    except ImportError as missing:
        raise UnsupportedModelError(
            f"architecture {architecture!r} needs the {source} package in the serving environment") from missing
    return _with_weights(model, state_file, device)


def _with_weights(model: nn.Module, state_file: Path, device: torch.device) -> nn.Module:
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as mismatch:  # missing/unexpected keys or shapes: the wrong architecture or classes
        raise UnsupportedModelError(f"{state_file.name} does not fit {type(model).__name__}: {mismatch}") from mismatch
    return model.to(device).eval()


def _refuse_torchscript(state_file: Path) -> None:
    if _is_torchscript(state_file):
        raise UnsupportedModelError(
            f"{state_file.name} is a TorchScript archive; explanations need an eager model: archive the "
            "model's state dict instead")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
