"""A layer's output as a feature map ``[B, K, h, w]``, and the layer CAM methods weigh by default.

Convolutional layers give ``[B, K, h, w]``. Swin-style stages give channels-last ``[B, h, w, K]``.
Vision transformers give token sequences ``[B, N, D]``: class (and distillation, register)
tokens first, then the patch grid row by row. Which one a tensor is, is read from its shape and
the input's proportions; ``reshape`` and ``prefix_tokens`` say it outright where that guess fails.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import nn

from ..errors import InvalidOptionError, UnsupportedModelError
from ..kernels.capture import ALL_LAYERS
from ..kernels.forward_record import ForwardRecord

LAYOUTS = ("auto", "nchw", "nhwc", "tokens")
MAX_PREFIX_TOKENS = 16


def check_layout(reshape: object, prefix_tokens: object) -> None:
    """Raises: InvalidOptionError for an unknown layout or a bad prefix token count."""
    if reshape not in LAYOUTS:
        raise InvalidOptionError(f"reshape must be one of {list(LAYOUTS)}, got {reshape!r}")
    if prefix_tokens is not None and (isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int)
                                      or prefix_tokens < 0):
        raise InvalidOptionError(f"prefix_tokens must be a non-negative integer, got {prefix_tokens!r}")


def token_grid(tokens: int, input_size: tuple[int, int], prefix_tokens: int | None = None):
    """``(prefix, rows, columns)`` of a token sequence whose patch grid has the input's proportions,
    with the fewest prefix tokens that make one; None if there is none."""
    height, width = input_size
    for prefix in ([prefix_tokens] if prefix_tokens is not None else range(MAX_PREFIX_TOKENS + 1)):
        patches = tokens - prefix
        if patches < 1:
            break
        rows = round(math.sqrt(patches * height / width))
        if rows >= 1 and patches % rows == 0:
            columns = patches // rows
            if abs(rows * width - columns * height) <= max(height, width) / max(rows, columns):
                return prefix, rows, columns
    return None


def _channels_last(shape: torch.Size, input_size: tuple[int, int]) -> bool:
    height, width = input_size
    first_matches = shape[2] * width == shape[3] * height  # [B, K, h, w] in the input's proportions
    last_matches = shape[1] * width == shape[2] * height  # [B, h, w, K]
    return last_matches and not first_matches


def as_feature_map(tensor: torch.Tensor, input_size: tuple[int, int], reshape: str = "auto",
                   prefix_tokens: int | None = None) -> torch.Tensor | None:
    """``tensor`` viewed as ``[B, K, h, w]``, or None when it has no spatial grid in that layout."""
    if tensor.dim() == 4 and reshape in ("auto", "nchw", "nhwc"):
        if reshape == "nhwc" or (reshape == "auto" and _channels_last(tensor.shape, input_size)):
            return tensor.permute(0, 3, 1, 2)
        return tensor
    if tensor.dim() == 3 and reshape in ("auto", "tokens"):
        grid = token_grid(tensor.shape[1], input_size, prefix_tokens)
        if grid is None:
            return None
        prefix, rows, columns = grid
        batch, _, channels = tensor.shape
        return tensor[:, prefix:, :].reshape(batch, rows, columns, channels).permute(0, 3, 1, 2)
    return None


# model -> (structure key, input size, layer name)
_defaults: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_defaults_lock = threading.Lock()


def default_layer(model: nn.Module, inputs: torch.Tensor) -> str:
    """The last layer, in the order module calls end, whose output is a feature map with spatial
    extent that the prediction depends on at two or more positions; of modules ending with the same
    output, the outermost (``layer4`` rather than ``layer4.1.relu``).

    Found from one forward of the first input row with every module captured and one backward from
    its top class, once per model and input size. This skips auxiliary heads (they do not run in
    eval mode), maps after global pooling (no spatial extent), a vision transformer's last blocks
    after its attention (the class token alone feeds the output there) and patch embeddings (other
    maps come later).

    Raises:
        UnsupportedModelError: no such layer.
    """
    size = tuple(inputs.shape[-2:])
    key = tuple(id(module) for module in model.modules())
    with _defaults_lock:
        cached = _defaults.get(model)
        if cached is not None and cached[:2] == (key, size):
            return cached[2]
    name = _find_default_layer(model, inputs[:1], size)
    with _defaults_lock:
        _defaults[model] = (key, size, name)
    return name


def _find_default_layer(model: nn.Module, example: torch.Tensor, size: tuple[int, int]) -> str:
    record = ForwardRecord(model, example, ALL_LAYERS)
    calls = [(names, output) for names, output in record.captured_calls if output.requires_grad]
    if not calls:
        raise UnsupportedModelError("Grad-CAM needs a layer with spatial extent and none feeds the output")
    target = record.logits.detach().argmax(dim=1)
    gradients = torch.autograd.grad(record.score(target), [output for _, output in calls], allow_unused=True)
    for (names, output), gradient in zip(reversed(calls), reversed(gradients)):
        if gradient is None:
            continue
        grid = as_feature_map(gradient, size)
        if grid is None or grid.shape[-2] * grid.shape[-1] < 2:
            continue
        if int((grid.abs().sum(dim=1) > 0).sum()) >= 2:
            return names[-1]
    raise UnsupportedModelError("Grad-CAM needs a layer with spatial extent that the output depends on; "
                                "this model has none")
