"""Score-CAM and Ablation-CAM: channel weights from extra forward passes, no gradients.

Both read the layer's activation ``A`` (``[B, K, h, w]`` as a feature map) captured in the
request's shared forward, weigh the ``max_channels`` channels of highest mean activation (per row;
the others weigh 0) with one model row each, run ``batch_size`` rows per forward pass, and return
``ReLU(Σ_k w_k A_k)`` upsampled bilinearly.

Cost: ``min(K, max_channels)`` model rows per explained row. ``cost()`` is called before the layer
has run, when ``K`` is not known yet: it states ``max_channels`` (an upper bound) until this model
has been explained at that layer and input size once, and the exact count after.
"""

from __future__ import annotations

import abc
import threading
import weakref

import torch
from torch import nn

from ..base import Cost
from ..errors import UnsupportedModelError
from ..kernels.capture import LayerCapture, capturing
from ..kernels.forward_record import ForwardRecord
from ..kernels.rule_models import rule_model_for, uses_traced_rules
from ..options import positive_int
from ..outputs import logits_of
from ..registry import register
from .cam import CamExplainer, upsample_to, weighted_channels
from .feature_maps import as_feature_map

_channel_counts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: K}
_channel_counts_lock = threading.Lock()


class PerturbationCam(CamExplainer):
    """Options: Grad-CAM's (``layer``, ``reshape``, ``prefix_tokens``), and
        max_channels: channels weighed, those of highest mean activation over positions (default 64).
        batch_size: model rows per forward pass (default 32).
    """

    def __init__(self, model: nn.Module, *, layer: str | None = None, reshape: str = "auto",
                 prefix_tokens: int | None = None, max_channels: int = 64, batch_size: int = 32):
        super().__init__(model, layer=layer, reshape=reshape, prefix_tokens=prefix_tokens)
        self.max_channels = positive_int("max_channels", max_channels)
        self.batch_size = positive_int("batch_size", batch_size)

    def _key(self, height: int, width: int) -> tuple:
        return self.layer, self.reshape, self.prefix_tokens, int(height), int(width)

    def cost(self, height: int, width: int) -> Cost:
        with _channel_counts_lock:
            known = _channel_counts.get(self.model, {}).get(self._key(height, width))
        rows = self.max_channels if known is None else min(known, self.max_channels)
        return Cost(evaluations=rows, backward_passes=0, rows_per_forward=min(self.batch_size, rows),
                    evaluations_option="max_channels", batch_option="batch_size")

    def layer_map(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        activation = self.activation(record)
        channels = activation.shape[1]
        with _channel_counts_lock:
            _channel_counts.setdefault(self.model, {})[self._key(*record.inputs.shape[-2:])] = channels
        chosen = activation.mean(dim=(2, 3)).topk(min(channels, self.max_channels), dim=1).indices  # [B, n]
        weights = torch.zeros(activation.shape[:2], dtype=activation.dtype, device=activation.device)
        with torch.no_grad():
            for row in range(activation.shape[0]):
                weights[row, chosen[row]] = self.channel_weights(record, row, chosen[row], targets[row])
        return weighted_channels(weights, activation)

    def chunks(self, count: int):
        return (slice(start, min(start + self.batch_size, count)) for start in range(0, count, self.batch_size))

    @abc.abstractmethod
    def channel_weights(self, record: ForwardRecord, row: int, channels: torch.Tensor,
                        target: torch.Tensor) -> torch.Tensor:
        """The weights ``[n]`` of ``channels`` of row ``row`` for its target class (no autograd)."""


@register("score_cam")
class ScoreCam(PerturbationCam):
    """Score-CAM (Wang et al. 2020): each channel's activation, upsampled to the input (bilinear,
    ``align_corners=False``) and min-max normalised to [0, 1] (a constant channel gives 0), masks
    the input; the channels' weights are the softmax over channels of the target logit of the
    masked inputs. The paper's baseline score is the same for every channel, so the softmax
    cancels it.

    Options: see :class:`PerturbationCam`. Cost: ``min(K, max_channels)`` model rows.

    pytorch-grad-cam's ``ScoreCAM`` computes the same weights over all channels but upsamples
    with ``align_corners=True``; the authors' code weighs by class probabilities without the
    softmax over channels.
    """

    def channel_weights(self, record, row, channels, target):
        size = tuple(record.inputs.shape[-2:])
        masks = upsample_to(self.activation(record)[row, channels][:, None], size)  # [n, 1, H, W]
        low, high = masks.amin(dim=(2, 3), keepdim=True), masks.amax(dim=(2, 3), keepdim=True)
        spread = high - low
        masks = torch.where(spread > 0, (masks - low) / torch.where(spread > 0, spread, torch.ones_like(spread)),
                            torch.zeros_like(masks))
        image = record.inputs.detach()[row:row + 1]
        scores = torch.cat([logits_of(self.model(image * masks[part]))[:, target]
                            for part in self.chunks(len(channels))])
        return torch.softmax(scores, dim=0)


class _AblatingCapture(LayerCapture):
    """Zeroes channel ``channels[i]`` of row ``i`` of one layer's output (every call of the layer)."""

    def __init__(self, layer: str, channels: torch.Tensor, explainer: CamExplainer, size: tuple[int, int]):
        super().__init__([layer])
        self.channels, self.explainer, self.size = channels, explainer, size

    def offer(self, names, value):
        if not isinstance(value, torch.Tensor) or not any(name in self.names for name in names):
            return value
        mask = torch.ones_like(value)
        grid = as_feature_map(mask, self.size, self.explainer.reshape, self.explainer.prefix_tokens)
        if grid is None or grid.shape[0] != len(self.channels):
            raise UnsupportedModelError(f"cannot ablate channels of {list(value.shape)}")
        grid[torch.arange(len(self.channels), device=value.device), self.channels.to(value.device)] = 0  # a view: writes into mask
        return value * mask


@register("ablation_cam")
class AblationCam(PerturbationCam):
    """Ablation-CAM (Desai & Ramaswamy 2020): ``w_k = (y - y_k) / |y|``, ``y`` the target logit and
    ``y_k`` the target logit with channel ``k`` of the layer's output set to 0 (0 where ``y`` is 0).
    The paper (and pytorch-grad-cam) divide by ``y``; the same for a positive logit, and for a
    negative one ``|y|`` keeps a channel whose removal lowers the score weighing positively.

    Each ablated channel is one row of a forward of the whole model (the layers before the layer
    run again: the cost is stated in whole-model rows). On a token sequence only the patch grid's
    channel is zeroed, not the class token's.

    Options: see :class:`PerturbationCam`. Cost: ``min(K, max_channels)`` model rows.

    pytorch-grad-cam's ``AblationCAM`` zeroes the channel when the layer's smallest output is 0 and
    otherwise sets it to that minimum minus 1e7; here it is always zeroed, as in the paper.
    """

    def channel_weights(self, record, row, channels, target):
        size = tuple(record.inputs.shape[-2:])
        image = record.inputs.detach()[row:row + 1]
        rule_model = rule_model_for(self.model, image)
        hooked = None if uses_traced_rules(self.model) else self.model
        scores = []
        for part in self.chunks(len(channels)):
            capture = _AblatingCapture(self._resolved, channels[part], self, size)
            with capturing(capture, hooked):
                scores.append(logits_of(rule_model(image.repeat(len(channels[part]), 1, 1, 1)))[:, target])
        score = record.logits.detach()[row, target]
        if score == 0:
            return torch.zeros(len(channels), dtype=record.logits.dtype, device=record.logits.device)
        return (score - torch.cat(scores)) / score.abs()
