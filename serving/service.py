"""Serving one batch of requests: decode, predict, explain on request, encode.

Framework-neutral: the TorchServe handler only adapts its request list and context to this. Every
request succeeds or fails on its own; a failed explanation still returns the prediction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from explainers import Explainer, logits_of
from explainers.api import build_explainers
from explainers.errors import (
    CostCapExceededError,
    ExplainerFailsSanityError,
    ExplainerNotAllowedError,
    InvalidOptionError,
    InvalidRequestError,
    PluginError,
)
from explainers.evaluation.maps import importance_map
from explainers.evaluation.perturbation import deletion_curve
from explainers.hygiene import explanation_mode
from explainers.registry import explainer_class
from explainers.run import ExplanationRun
from explainers.validation import model_device

from .caps import check_cost
from .frames import FrameGeometry, ImageFrame
from .images import Preprocessor, decode_image, unit_image
from .metrics import Metrics
from .rendering.encode import JSON_MAX_CELLS, encode_attribution, require_json_frame_size
from .rendering.options import RenderOptions
from .replies import Reply, as_plugin_error, error_reply
from .requests import ExplainRequest, RawRequest, parse_request
from .sanity import SanityReport
from .settings import ServingSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Prepared:
    request: ExplainRequest
    model_input: torch.Tensor  # [1, 3, H, W], normalised
    pixels: torch.Tensor  # uint8 [3, H, W] at the model's input size, for overlays
    render: RenderOptions | None  # None for a predict-only request
    geometry: FrameGeometry
    # Maps in the client's image frame, and that image at the frame's size for overlays.
    image_frame: ImageFrame | None = None
    frame_image: torch.Tensor | None = None


class ExplanationService:
    """Serves predictions, with explanations for the requests that ask for them."""

    def __init__(self, model: nn.Module, settings: ServingSettings, metrics: Metrics | None = None,
                 sanity: SanityReport | None = None):
        """``sanity``: the explainers' checks on this model (:func:`serving.sanity.load_or_measure`);
        without it responses carry no verdicts and ``sanity_policy`` has nothing to act on."""
        self.model = model.eval()
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.sanity = sanity
        if sanity is not None:
            self.metrics.sanity(sanity.gauge_values())
        self.device = model_device(model)
        self.preprocessor = Preprocessor(size=settings.input_size, mean=settings.mean, std=settings.std,
                                         resize=settings.resize, interpolation=settings.interpolation)
        RenderOptions.from_mapping(settings.render, None)  # a bad render default fails the load

    # --- the batch ------------------------------------------------------------------------

    def handle(self, raw_requests: Sequence[RawRequest | PluginError]) -> list[Reply]:
        """One reply per request, in order; an entry that is already an error is answered with it."""
        replies: list[Reply | None] = [None] * len(raw_requests)
        prepared: dict[int, _Prepared] = {}
        for index, raw in enumerate(raw_requests):
            if isinstance(raw, PluginError):
                replies[index] = self._error_reply(raw, "predict")
                continue
            route = "explain" if raw.explain_route else "predict"
            try:
                prepared[index] = self._prepare(raw)
            except Exception as error:  # one bad request must not fail its batch
                replies[index] = self._error_reply(error, route)
        plain = [index for index, item in prepared.items() if not item.request.explainers]
        if plain:
            for index, reply in zip(plain, self._predict([prepared[i] for i in plain])):
                replies[index] = reply
        for index, item in prepared.items():
            if item.request.explainers:
                replies[index] = self._explain(item)
        self.metrics.requests(replies)
        return replies

    def _error_reply(self, error: BaseException, route: str) -> Reply:
        reply = error_reply(error, route)
        self.metrics.error(reply.error_code)
        return reply

    # --- decoding and checks ----------------------------------------------------------------

    def _prepare(self, raw: RawRequest) -> _Prepared:
        settings = self.settings
        with self.metrics.stage("decode"):
            request = parse_request(raw, settings)
            self._check_explainers(request)
            # Predict-only requests never render: their options are checked only when they carry some.
            render = self._render_options(request) if request.explainers or request.render_overrides else None
            image = decode_image(request.image_bytes, max_pixels=settings.caps.max_image_pixels)
        with self.metrics.stage("preprocess"):
            pixels, geometry = self.preprocessor.prepare(image)
            model_input = self.preprocessor.normalise(pixels)
            if render is None or render.frame != "image":
                return _Prepared(request, model_input, pixels, render, geometry)
            image_frame = ImageFrame(geometry, geometry.image_frame_size(settings.caps.max_frame_pixels))
            if render.encoding == "json":
                require_json_frame_size(image_frame.size)
            frame_image = None
            if render.encoding == "overlay" and render.overlay_base != "none":
                frame_image = _image_at(image, image_frame.size)
        return _Prepared(request, model_input, pixels, render, geometry, image_frame, frame_image)

    def _check_explainers(self, request: ExplainRequest) -> None:
        caps, allowed = self.settings.caps, self.settings.allowed
        for name in request.explainers:
            explainer_class(name)  # UnknownExplainerError lists the registered names
            if name not in allowed:
                raise ExplainerNotAllowedError(f"explainer {name!r} is not enabled for this model; allowed: {list(allowed)}")
            self._check_sanity(name)
        if len(request.explainers) > caps.max_explainers_per_request:
            raise CostCapExceededError(
                f"{len(request.explainers)} explainers requested; this model allows {caps.max_explainers_per_request} per request",
                cap="max_explainers_per_request")
        stray = sorted(set(request.method_options) - set(request.explainers))
        if stray:
            raise InvalidRequestError(f"options given for explainer(s) not requested: {stray}")
        if request.target is not None and request.explain_top_k > 1:
            raise InvalidRequestError("give either \"target\" or \"explain_top_k\", not both")
        self._check_quality(request)

    def _check_sanity(self, name: str) -> None:
        if self.settings.sanity_policy != "refuse" or self.sanity is None:
            return
        failed = self.sanity.failed_checks(name)
        if failed:
            raise ExplainerFailsSanityError(
                f"explainer {name!r} failed the sanity check(s) {list(failed)} on this model and its "
                f"sanity_policy is refuse: {'; '.join(self.sanity.warnings(name))}", failed)

    def _check_quality(self, request: ExplainRequest) -> None:
        if request.quality_steps is None:
            return
        if not request.explainers:
            raise InvalidRequestError("\"quality\" scores explanations: ask for one with \"explain\" or the explanations route")
        cap = self.settings.caps.max_quality_steps
        if cap == 0:
            raise CostCapExceededError("quality scores are turned off for this model", cap="max_quality_steps")
        if request.quality_steps > cap:
            raise CostCapExceededError(f"quality steps={request.quality_steps} exceeds the cap of {cap}",
                                       cap="max_quality_steps")

    def _render_options(self, request: ExplainRequest) -> RenderOptions:
        overrides = dict(request.render_overrides)
        coarse_cap = self.settings.caps.coarse_output
        if coarse_cap is not None:
            # A client may ask for coarser maps than the cap, never finer ones.
            asked = overrides.get("coarse_size", self.settings.render.get("coarse_size"))
            overrides["coarse_size"] = coarse_cap if not isinstance(asked, int) else min(asked, coarse_cap)
        render = RenderOptions.from_mapping(self.settings.render, overrides)
        height, width = self.settings.input_size
        cells = render.coarse_size ** 2 if render.coarse_size else height * width
        # In the image frame the map's size is the image's, known after decoding (checked there).
        if render.encoding == "json" and render.frame == "input" and cells > JSON_MAX_CELLS:
            raise InvalidOptionError(
                f"encoding 'json' is for small maps only ({JSON_MAX_CELLS} values); this model's maps have {cells}: use png or npy-f16")
        return render

    def _explainers(self, request: ExplainRequest) -> list[Explainer]:
        options = {
            name: {**self._pixel_bounds(name), **self.settings.explainer_options.get(name, {}),
                   **request.method_options.get(name, {})}
            for name in request.explainers
        }
        explainers = build_explainers(self.model, list(request.explainers), options)
        for explainer in explainers:
            check_cost(explainer, self.settings.caps, self.settings.input_size)
        return explainers

    def _pixel_bounds(self, name: str) -> dict:
        """``{"low": [...], "high": [...]}``: the model-input values of pixels 0 and 1 per channel, for an
        explainer that takes the input's bounds (``takes_input_bounds``, e.g. lrp's z^B rule); else ``{}``.
        Configured or requested options override them."""
        try:
            takes = getattr(explainer_class(name), "takes_input_bounds", False)
        except PluginError:
            return {}  # an unknown name: refused where the explainers are built
        if not takes:
            return {}
        mean, std = self.settings.mean, self.settings.std
        return {"low": [(0.0 - m) / s for m, s in zip(mean, std)], "high": [(1.0 - m) / s for m, s in zip(mean, std)]}

    # --- prediction and explanation --------------------------------------------------------

    def _predictions(self, logits: torch.Tensor, top_ks: Sequence[int]) -> list[list[dict]]:
        """Each row's ``top_k`` classes with probabilities: one softmax and one top-k for the batch."""
        scores, indices = torch.softmax(logits.float(), dim=-1).topk(max(top_ks), dim=-1)
        names = self.settings.class_names
        return [[{"index": i, "label": names[i], "score": round(s, 6)} for s, i in zip(row_scores[:k], row_indices[:k])]
                for row_scores, row_indices, k in zip(scores.tolist(), indices.tolist(), top_ks)]

    def _predict(self, items: list[_Prepared]) -> list[Reply]:
        try:
            inputs = items[0].model_input if len(items) == 1 else torch.cat([item.model_input for item in items])
            with self.metrics.stage("inference"), torch.inference_mode():
                logits = logits_of(self.model(inputs.to(self.device))).cpu()
        except Exception as error:
            return [self._error_reply(error, "predict") for _ in items]
        predictions = self._predictions(logits, [item.request.top_k for item in items])
        return [Reply(200, {"predictions": rows}, "predict") for rows in predictions]

    def _explain(self, item: _Prepared) -> Reply:
        request, route = item.request, item.request.route
        try:
            explainers = self._explainers(request)
            with explanation_mode(self.model):
                with self.metrics.stage("inference"):
                    run = ExplanationRun(self.model, item.model_input, explainers, request.target)
                logits = run.logits.detach()[0].cpu()
                if request.explain_top_k > 1:
                    targets = logits.topk(request.explain_top_k).indices.tolist()
                else:
                    targets = [int(run.targets[0])]
                explanations, errors = {}, {}
                for explainer in explainers:
                    try:
                        explanations[explainer.name] = self._explain_with(run, explainer, targets, item)
                    except Exception as error:
                        if not isinstance(error, PluginError):
                            logger.exception("explainer %s failed", explainer.name)
                        errors[explainer.name] = entry = as_plugin_error(error).to_dict()
                        self.metrics.error(entry["code"])
                        self.metrics.explanation(explainer.name, ok=False)
        except Exception as error:
            return self._error_reply(error, route)
        body = {"predictions": self._predictions(logits[None], [request.top_k])[0], "explanations": explanations}
        if errors:
            body["explanation_errors"] = errors
        return Reply(200, body, route)

    def _explain_with(self, run: ExplanationRun, explainer: Explainer, targets: list[int], item: _Prepared):
        entries = []
        if item.image_frame is not None:
            image = item.frame_image
        else:
            image = unit_image(item.pixels) if item.render.encoding == "overlay" else None
        steps = item.request.quality_steps
        for target in targets:
            # A quality score is part of what the explanation costs, so it is timed with it.
            started = time.perf_counter()
            with self.metrics.stage("explain", explainer.name):
                explanation = run.explain(explainer, torch.tensor([target], device=run.logits.device))
                quality = self._quality(run, explanation.attributions, target, steps) if steps else None
            latency_ms = round((time.perf_counter() - started) * 1000, 2)
            with self.metrics.stage("encode"):
                entry = encode_attribution(explanation.attributions[0].cpu(), options=item.render, image=image,
                                           image_frame=item.image_frame)
            entry = {"target": {"index": target, "label": self.settings.class_names[target]}, **entry,
                     "latency_ms": latency_ms}
            # What the explainer did, so a client can tell a rule method's map from a plain gradient.
            if explainer.applies_rules:
                entry["rule_sites"] = dict(explanation.rule_sites)
            if explanation.layer is not None:
                entry["layer"] = explanation.layer
            entry.update(self._sanity_fields(explainer.name))
            if quality is not None:
                entry["quality"] = quality
                for metric, value in quality.items():
                    self.metrics.quality(explainer.name, metric, value)
            entries.append(entry)
        self.metrics.explanation(explainer.name, ok=True, payload_bytes=sum(len(str(e["data"])) for e in entries))
        return entries[0] if len(entries) == 1 else entries

    def _sanity_fields(self, name: str) -> dict:
        """The explainer's verdicts on this model, and under ``warn`` what each failed check means."""
        verdicts = None if self.sanity is None else self.sanity.verdicts(name)
        if verdicts is None:
            return {}
        fields = {"sanity": verdicts}
        if self.settings.sanity_policy == "warn" and self.sanity.failed_checks(name):
            fields["warnings"] = self.sanity.warnings(name)
        return fields

    def _quality(self, run: ExplanationRun, attributions: torch.Tensor, target: int, steps: int) -> dict[str, float]:
        """Cheap faithfulness score of one explanation: the deletion AUC at ``steps`` steps.

        Pixels go, most important first, to the model-input value 0 (the normalisation's mean
        colour); ``steps + 1`` forwards of the one image, batched. Lower is better: 0.1 means the
        prediction collapsed as soon as the top-ranked pixels went.
        """
        curve = deletion_curve(self.model, run.inputs, importance_map(attributions), torch.tensor([target]),
                               steps=steps)
        return {"deletion_auc": round(float(curve.auc[0]), 4)}


def _image_at(image, size: tuple[int, int]) -> torch.Tensor:
    """The client's RGB image as float ``[3, H, W]`` in ``[0, 1]`` at ``size`` (a copy when unchanged)."""
    height, width = size
    if (image.height, image.width) != (height, width):
        image = image.resize((width, height), resample=Image.Resampling.BILINEAR)
    return unit_image(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1))
