"""Checks on what callers pass in: input tensors and target classes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import InvalidInputError, InvalidTargetError

TargetSpec = None | int | Sequence[int] | torch.Tensor


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def validate_inputs(inputs: object, model: nn.Module) -> torch.Tensor:
    """A detached float ``[B, C, H, W]`` copy of ``inputs`` on the model's device.

    Raises:
        InvalidInputError: not a tensor, not floating point, not 4-D, empty, or not finite.
    """
    if not isinstance(inputs, torch.Tensor):
        raise InvalidInputError(f"inputs must be a torch.Tensor [B, C, H, W], got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise InvalidInputError(f"inputs must be a floating point tensor, got dtype {inputs.dtype}")
    if inputs.dim() != 4:
        raise InvalidInputError(f"inputs must have shape [B, C, H, W], got {list(inputs.shape)}")
    if inputs.numel() == 0:
        raise InvalidInputError(f"inputs must not be empty, got shape {list(inputs.shape)}")
    if not torch.isfinite(inputs).all():
        raise InvalidInputError("inputs contain NaN or infinite values")
    # clone() also turns an inference-mode tensor into one autograd may save.
    with torch.inference_mode(False):
        return inputs.detach().to(model_device(model)).clone()


def check_target_spec(target: object, batch_size: int) -> None:
    """Rejects a target of the wrong type or length before any forward pass is paid for.

    Raises:
        InvalidTargetError: anything but None, an int, a sequence of ints or an integer tensor of
            length ``batch_size``.
    """
    if target is None:
        return
    if isinstance(target, bool) or (isinstance(target, torch.Tensor) and target.dtype == torch.bool):
        raise InvalidTargetError("target must be a class index, not a boolean")
    if isinstance(target, int):
        return
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex():
            raise InvalidTargetError(f"target tensor must hold integers, got dtype {target.dtype}")
        if target.dim() == 0:
            return
        if target.dim() != 1 or target.numel() != batch_size:
            raise InvalidTargetError(
                f"target tensor must have shape [{batch_size}] (one class per row), got {list(target.shape)}"
            )
        return
    if isinstance(target, Sequence) and not isinstance(target, (str, bytes)):
        if len(target) != batch_size:
            raise InvalidTargetError(f"target must list one class per row: expected {batch_size}, got {len(target)}")
        for item in target:
            if isinstance(item, bool) or not isinstance(item, int):
                raise InvalidTargetError(f"target entries must be ints, got {item!r}")
        return
    raise InvalidTargetError(
        f"target must be None, an int, a sequence of ints or a LongTensor, got {type(target).__name__}"
    )


def resolve_targets(target: TargetSpec, logits: torch.Tensor) -> torch.Tensor:
    """The class explained for each row, as a LongTensor ``[B]`` on the logits' device.

    Raises:
        InvalidTargetError: wrong type or length, or a class index outside ``[0, num_classes)``.
    """
    batch_size, num_classes = logits.shape[0], logits.shape[1]
    check_target_spec(target, batch_size)
    if target is None:
        return logits.detach().argmax(dim=1)
    if isinstance(target, torch.Tensor):
        targets = target.to(device=logits.device, dtype=torch.long).reshape(-1).expand(batch_size).clone()
    elif isinstance(target, int):
        targets = torch.full((batch_size,), target, dtype=torch.long, device=logits.device)
    else:
        targets = torch.tensor(list(target), dtype=torch.long, device=logits.device)
    out_of_range = (targets < 0) | (targets >= num_classes)
    if out_of_range.any():
        bad = targets[out_of_range].tolist()
        raise InvalidTargetError(f"target class index out of range [0, {num_classes}): {bad}")
    return targets
