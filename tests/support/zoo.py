"""Real architectures with random weights, built fast and calibrated so their signals neither
vanish nor explode: torchvision classification models and small timm models.

Building every torchvision model with its own initialisation costs minutes on two cores (each
weight is drawn twice, by the layer and again by the builder, much of it from normal and
truncated-normal draws). The builders' random initialisers are therefore recorded, not run, and
each recorded tensor is drawn once afterwards from a seeded uniform distribution with the mean and
standard deviation the builder asked for. Constants (ones, zeros, layer scales, fixed buffers) are
the builder's own, except scales initialised at zero (see :func:`revive_dormant_scales`). Batch norms are then calibrated on noise: their running statistics are the
statistics of a few noise batches, so every normalised layer sees unit-scale signals in eval mode.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator

import torch
from torch import nn

CALIBRATION_BATCH_SIZE = 8
# The battery's own inputs (seeds 0 and 1, see noise_inputs) are among the calibration rows: deep
# networks at 1x1 maps see almost no variation between noise images, so statistics of a few other
# rows amplify a new row's deviation layer after layer (efficientnet_v2_l: logits of 1e9).
CALIBRATION_SEEDS = ((0, 1), (1, 2))


def input_size_for(name: str) -> int:
    """The smallest square input each torchvision architecture accepts (32 where it can)."""
    if name == "alexnet":
        return 64   # three 3x3/2 max pools after an 11x11/4 convolution
    if name == "inception_v3":
        return 75   # the documented minimum
    if name == "maxvit_t":
        return 224  # every stage's map must divide into 7x7 partitions
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        return 2 * patch   # a 2x2 grid of patches
    return 32


def torchvision_kwargs(name: str, size: int) -> dict:
    if name.startswith("vit_"):
        return {"image_size": size}
    if name in ("googlenet", "inception_v3"):
        # init_weights=False: their scipy truncated-normal init is the slow path the builders warn about.
        return {"init_weights": False}
    return {}


def _std_for_fan(tensor: torch.Tensor, gain: float, mode: str) -> float:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(tensor)
    fan = fan_in if mode == "fan_in" else fan_out
    return gain / math.sqrt(max(fan, 1))


@contextlib.contextmanager
def recorded_random_init() -> Iterator[dict]:
    """Within: ``torch.nn.init``'s random initialisers record ``tensor -> (mean, std, low, high)``
    instead of drawing. The last request for a tensor wins, as it would have."""
    requests: dict[int, tuple] = {}

    def record(tensor, mean, std, low=-math.inf, high=math.inf):
        requests[id(tensor)] = (tensor, float(mean), float(std), low, high)
        return tensor

    def uniform_(tensor, a=0.0, b=1.0, generator=None):
        return record(tensor, (a + b) / 2, (b - a) / math.sqrt(12), a, b)

    def normal_(tensor, mean=0.0, std=1.0, generator=None):
        return record(tensor, mean, std)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        return record(tensor, mean, std, a, b)

    def kaiming_uniform_(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu", generator=None):
        gain = nn.init.calculate_gain(nonlinearity, a)
        return record(tensor, 0.0, _std_for_fan(tensor, gain, mode))

    def kaiming_normal_(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu", generator=None):
        gain = nn.init.calculate_gain(nonlinearity, a)
        return record(tensor, 0.0, _std_for_fan(tensor, gain, mode))

    def xavier_uniform_(tensor, gain=1.0, generator=None):
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(tensor)
        return record(tensor, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))

    xavier_normal_ = xavier_uniform_

    replacements = {"uniform_": uniform_, "normal_": normal_, "trunc_normal_": trunc_normal_,
                    "kaiming_uniform_": kaiming_uniform_, "kaiming_normal_": kaiming_normal_,
                    "xavier_uniform_": xavier_uniform_, "xavier_normal_": xavier_normal_}
    originals = {name: getattr(nn.init, name) for name in replacements}
    for name, replacement in replacements.items():
        setattr(nn.init, name, replacement)
    try:
        yield requests
    finally:
        for name, original in originals.items():
            setattr(nn.init, name, original)


# Odd, so a tensor longer than the pool does not repeat it row for row.
_POOL_SIZE = 2**22 - 3


def draw(requests: dict, seed: int) -> None:
    """Each recorded tensor drawn once, uniformly, with the mean and spread asked for.

    The draws come from one seeded pool of uniform numbers, each tensor read from its own random
    offset (tiled where it is longer than the pool): a fresh draw of every weight of the largest
    models costs tens of seconds on two cores, a copy of the pool a fraction of one.
    """
    generator = torch.Generator().manual_seed(seed)
    pool = torch.rand(_POOL_SIZE, generator=generator) * 2.0 - 1.0
    pool = torch.cat([pool, pool])   # a read from any offset runs _POOL_SIZE without wrapping
    with torch.no_grad():
        for tensor, mean, std, low, high in requests.values():
            flat = tensor.view(-1)
            start = int(torch.randint(_POOL_SIZE, (), generator=generator))
            for begin in range(0, flat.numel(), _POOL_SIZE):
                chunk = flat[begin:begin + _POOL_SIZE]
                torch.mul(pool[start:start + chunk.numel()], math.sqrt(3.0) * std, out=chunk)
            if mean:
                flat.add_(mean)
            if math.isfinite(low) or math.isfinite(high):
                flat.clamp_(low, high)


def revive_dormant_scales(model: nn.Module) -> nn.Module:
    """Scales initialised at (or next to) zero set to one: layer scales of 1e-6 (ConvNeXt, CaiT),
    zero-initialised last batch-norm weights of residual branches (timm ResNets), skip-init gains
    (NFNets). At zero a branch passes almost nothing, so a test could not tell a rule at its
    activations from the plain gradient."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or not parameter.is_floating_point() or parameter.numel() == 0:
                continue
            if parameter.abs().max() < 1e-4:
                parameter.fill_(1.0)
    return model


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode())


def noise_inputs(size: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def calibrate_batchnorm(model: nn.Module, input_size: int, seed: int) -> nn.Module:
    """Running statistics of every batch norm set to those of one noise batch; returns the model in eval mode.

    Only the batch norms run in training mode, so dropout, stochastic depth and auxiliary heads
    stay as in eval.
    """
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    if not norms:
        return model
    momenta = {}
    for norm in norms:
        momenta[norm] = norm.momentum
        norm.reset_running_stats()
        norm.momentum = None   # a plain average (here of the one batch)
        norm.train()
    rows = [noise_inputs(input_size, batch, row_seed) for row_seed, batch in CALIBRATION_SEEDS]
    others = CALIBRATION_BATCH_SIZE - sum(len(row) for row in rows)
    rows.append(torch.randn(others, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        model(torch.cat(rows))
    for norm in norms:
        norm.momentum = momenta[norm]
    return model.eval()


def build_torchvision(name: str, size: int | None = None) -> tuple[nn.Module, int]:
    """``(model in eval mode, input side)`` for a torchvision classification model, random weights.

    ``size``: the input side (default the smallest the architecture takes); vision transformers
    are built for it.
    """
    import torchvision

    size = size or input_size_for(name)
    seed = seed_of(name)
    torch.manual_seed(seed)   # the few weights builders draw with tensor methods
    with recorded_random_init() as requests:
        model = torchvision.models.get_model(name, weights=None, **torchvision_kwargs(name, size))
    draw(requests, seed)
    return calibrate_batchnorm(revive_dormant_scales(model), size, seed), size


def build_timm(name: str, size: int, **kwargs) -> nn.Module:
    """A timm model in eval mode, random weights (``pretrained=False``), calibrated batch norms."""
    import timm

    seed = seed_of(name)
    torch.manual_seed(seed)
    with recorded_random_init() as requests:
        model = timm.create_model(name, pretrained=False, **kwargs)
    draw(requests, seed)
    return calibrate_batchnorm(revive_dormant_scales(model), size, seed)


_SAMPLED_ABOVE = 2**16


def _sample(tensor: torch.Tensor) -> tuple:
    """The values of a small tensor; of a large one, evenly spaced values and its version counter
    (any in-place write through autograd's view of it counts)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() > _SAMPLED_ABOVE:
        flat = flat[:: flat.numel() // 4096 + 1]
    return tuple(flat.tolist())


class ModelFingerprint:
    """What explaining must not change: parameters and buffers (the same tensors, unmodified),
    training flags, hooks and ``requires_grad``.

    Tensors are compared by identity, storage, version counter and values (all of a small tensor,
    a sample of a large one), so the check does not copy the hundreds of megabytes of the
    largest models.
    """

    def __init__(self, model: nn.Module):
        self.tensors = self._tensors(model)
        self.flags = [(name, module.training) for name, module in model.named_modules()]
        self.hooks = self._hooks(model)

    @staticmethod
    def _tensors(model: nn.Module) -> dict:
        state = {}
        for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, tensor in items:
                state[f"{kind} {name}"] = (id(tensor), tensor.data_ptr(), tensor._version, tuple(tensor.shape),
                                           tensor.dtype, tensor.requires_grad, _sample(tensor))
        return state

    @staticmethod
    def _hooks(model: nn.Module) -> list:
        kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                 "_state_dict_hooks", "_load_state_dict_pre_hooks")
        found = []
        for name, module in model.named_modules():
            for kind in kinds:
                hooks = getattr(module, kind, None)
                if hooks:
                    found.append((name, kind, tuple(hooks)))
        for name, parameter in model.named_parameters():
            if getattr(parameter, "_backward_hooks", None):
                found.append((name, "parameter hooks", tuple(parameter._backward_hooks)))
        return found

    def differences(self, model: nn.Module) -> list[str]:
        after = ModelFingerprint(model)
        problems = []
        for key in sorted(set(self.tensors) | set(after.tensors)):
            if self.tensors.get(key) != after.tensors.get(key):
                problems.append(f"{key}: {self.tensors.get(key)} -> {after.tensors.get(key)}")
        if self.flags != after.flags:
            problems.append("training flags changed: " + ", ".join(
                f"{name}: {was} -> {now}" for (name, was), (_, now) in zip(self.flags, after.flags) if was != now))
        if self.hooks != after.hooks:
            problems.append(f"hooks changed: {self.hooks} -> {after.hooks}")
        return problems
