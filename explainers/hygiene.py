"""Explaining a model must leave it exactly as it was."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

_lock = threading.Lock()
# model id -> [explanations in progress, modules that were in training mode]; the first in saves, the last out restores,
# so concurrent explanations of one model never restore flags under each other's feet.
_in_progress: dict[int, list] = {}


@contextlib.contextmanager
def explanation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and autograd on for the duration; every module's training flag restored after.

    Works inside ``torch.no_grad()`` and ``torch.inference_mode()`` callers, and restores the
    flags also when the explanation raises.
    """
    key = id(model)
    with _lock:
        entry = _in_progress.get(key)
        if entry is None:
            # Only the modules in training mode need saving: a served model (all in eval mode)
            # costs one pass over its modules, not a train(False) walk and a restore per request.
            training = [module for module in model.modules() if module.training]
            entry = _in_progress[key] = [0, training]
            if training:
                model.eval()
        entry[0] += 1
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        with _lock:
            entry[0] -= 1
            if entry[0] == 0:
                del _in_progress[key]
                if entry[1]:
                    trained = {id(module) for module in entry[1]}
                    for module in model.modules():  # eval() may have been overridden to keep some in training
                        module.training = id(module) in trained
