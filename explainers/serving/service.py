"""Serving one batch of requests: decode, predict, explain on request, encode.

Framework-neutral: the TorchServe handler only adapts its request list and context to this. Every
request succeeds or fails on its own; a failed explanation still returns the prediction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..api import ExplanationRun, build_explainers
from ..base import Explainer
from ..captum_methods import IntegratedGradientsExplainer, OcclusionExplainer, SmoothGradExplainer
from ..errors import (
    CostCapExceededError,
    ExplainerNotAllowedError,
    ExplanationFailedError,
    InvalidOptionError,
    InvalidRequestError,
    PluginError,
    ResourceExhaustedError,
)
from ..evaluation.maps import importance_map
from ..evaluation.perturbation import deletion_curve
from ..hygiene import explanation_mode
from ..metrics import Metrics
from ..registry import explainer_class
from ..render_options import RenderOptions
from ..rendering import JSON_MAX_CELLS, encode_attribution
from ..validation import model_device
from .images import decode_image, to_model_input
from .requests import ExplainRequest, RawRequest, parse_request
from .settings import ServingSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict
    route: str = "predict"


@dataclass(frozen=True)
class _Prepared:
    request: ExplainRequest
    model_input: torch.Tensor  # [1, 3, H, W], normalised
    display_image: torch.Tensor  # [3, H, W] in [0, 1], for overlays
    render: RenderOptions | None  # None for a predict-only request


def _failure(error: BaseException) -> PluginError:
    """The typed error a caught exception is reported as."""
    if isinstance(error, PluginError):
        return error
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(error):
        return ResourceExhaustedError(f"out of memory: {error or type(error).__name__}")
    return ExplanationFailedError(f"{type(error).__name__}: {error}")


def _rows_per_forward(explainer: Explainer) -> tuple[int, str]:
    """The batch one forward pass of a batched method gets, and the option that sets it."""
    if isinstance(explainer, IntegratedGradientsExplainer):
        return min(explainer.internal_batch_size or explainer.n_steps, explainer.n_steps), "internal_batch_size"
    if isinstance(explainer, SmoothGradExplainer):
        return min(explainer.batch_size or explainer.samples, explainer.samples), "batch_size"
    if isinstance(explainer, OcclusionExplainer):
        # Captum repeats the input this many times whatever the number of windows.
        return explainer.perturbations_per_eval, "perturbations_per_eval"
    return 1, ""


class ExplanationService:
    """Serves predictions, with explanations for the requests that ask for them."""

    def __init__(self, model: nn.Module, settings: ServingSettings, metrics: Metrics | None = None):
        self.model = model.eval()
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.device = model_device(model)
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
        failure = error if isinstance(error, PluginError) else None
        if failure is None:
            logger.exception("unexpected error while serving a request")
            failure = _failure(error)
            code = "internal" if isinstance(failure, ExplanationFailedError) else failure.code
            body = {"code": code, "message": failure.message}
        else:
            code, body = failure.code, failure.to_dict()
        self.metrics.error(code)
        return Reply(failure.http_status, {"error": body}, route)

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
            model_input, display = to_model_input(image, size=settings.input_size, mean=settings.mean, std=settings.std)
        return _Prepared(request, model_input, display, render)

    def _check_explainers(self, request: ExplainRequest) -> None:
        caps, allowed = self.settings.caps, self.settings.allowed
        for name in request.explainers:
            explainer_class(name)  # UnknownExplainerError lists the registered names
            if name not in allowed:
                raise ExplainerNotAllowedError(f"explainer {name!r} is not enabled for this model; allowed: {list(allowed)}")
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
        if render.encoding == "json" and cells > JSON_MAX_CELLS:
            raise InvalidOptionError(
                f"encoding 'json' is for small maps only ({JSON_MAX_CELLS} values); this model's maps have {cells}: use png or npy-f16")
        return render

    def _explainers(self, request: ExplainRequest) -> list[Explainer]:
        options = {
            name: {**self.settings.explainer_options.get(name, {}), **request.method_options.get(name, {})}
            for name in request.explainers
        }
        explainers = build_explainers(self.model, list(request.explainers), options)
        for explainer in explainers:
            self._check_cost(explainer)
        return explainers

    def _check_cost(self, explainer: Explainer) -> None:
        caps = self.settings.caps
        if isinstance(explainer, IntegratedGradientsExplainer) and explainer.n_steps > caps.max_integrated_gradients_steps:
            raise CostCapExceededError(
                f"integrated_gradients n_steps={explainer.n_steps} exceeds the cap of {caps.max_integrated_gradients_steps}",
                cap="max_integrated_gradients_steps")
        if isinstance(explainer, SmoothGradExplainer) and explainer.samples > caps.max_smoothgrad_samples:
            raise CostCapExceededError(
                f"smoothgrad samples={explainer.samples} exceeds the cap of {caps.max_smoothgrad_samples}",
                cap="max_smoothgrad_samples")
        rows, option = _rows_per_forward(explainer)
        if rows > caps.max_batch_per_forward:
            raise CostCapExceededError(
                f"{explainer.name} would run {rows} rows in one forward pass, over the cap of "
                f"{caps.max_batch_per_forward}: set its option {option} to at most that",
                cap="max_batch_per_forward")
        if isinstance(explainer, OcclusionExplainer):
            evaluations = explainer.evaluations(*self.settings.input_size)
            if evaluations > caps.max_occlusion_evaluations:
                raise CostCapExceededError(
                    f"occlusion needs {evaluations} evaluations, over the cap of {caps.max_occlusion_evaluations}",
                    cap="max_occlusion_evaluations")

    # --- prediction and explanation --------------------------------------------------------

    def _predictions(self, logits: torch.Tensor, top_k: int) -> list[dict]:
        probabilities = torch.softmax(logits.float(), dim=-1)
        scores, indices = probabilities.topk(top_k)
        return [{"index": int(i), "label": self.settings.class_names[int(i)], "score": round(float(s), 6)}
                for s, i in zip(scores.tolist(), indices.tolist())]

    def _predict(self, items: list[_Prepared]) -> list[Reply]:
        try:
            with self.metrics.stage("inference"), torch.inference_mode():
                logits = self.model(torch.cat([item.model_input for item in items]).to(self.device)).cpu()
        except Exception as error:
            return [self._error_reply(error, "predict") for _ in items]
        return [Reply(200, {"predictions": self._predictions(row, item.request.top_k)}, "predict")
                for row, item in zip(logits, items)]

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
                        failure = _failure(error)
                        if not isinstance(error, PluginError):
                            logger.exception("explainer %s failed", explainer.name)
                        errors[explainer.name] = failure.to_dict()
                        self.metrics.error(failure.code)
                        self.metrics.explanation(explainer.name, ok=False)
        except Exception as error:
            return self._error_reply(error, route)
        body = {"predictions": self._predictions(logits, request.top_k), "explanations": explanations}
        if errors:
            body["explanation_errors"] = errors
        return Reply(200, body, route)

    def _explain_with(self, run: ExplanationRun, explainer: Explainer, targets: list[int], item: _Prepared):
        entries = []
        steps = item.request.quality_steps
        for target in targets:
            # A quality score is part of what the explanation costs, so it is timed with it.
            with self.metrics.stage("explain", explainer.name):
                explanation = run.explain(explainer, torch.tensor([target], device=run.logits.device))
                quality = self._quality(run, explanation.attributions, target, steps) if steps else None
            with self.metrics.stage("encode"):
                entry = encode_attribution(explanation.attributions[0].cpu(), options=item.render, image=item.display_image)
            entry = {"target": {"index": target, "label": self.settings.class_names[target]}, **entry}
            if quality is not None:
                entry["quality"] = quality
                for metric, value in quality.items():
                    self.metrics.quality(explainer.name, metric, value)
            entries.append(entry)
        self.metrics.explanation(explainer.name, ok=True, payload_bytes=sum(len(str(e["data"])) for e in entries))
        return entries[0] if len(entries) == 1 else entries

    def _quality(self, run: ExplanationRun, attributions: torch.Tensor, target: int, steps: int) -> dict[str, float]:
        """Cheap faithfulness score of one explanation: the deletion AUC at ``steps`` steps.

        Pixels go, most important first, to the model-input value 0 (the normalisation's mean
        colour); ``steps + 1`` forwards of the one image, batched. Lower is better: 0.1 means the
        prediction collapsed as soon as the top-ranked pixels went.
        """
        curve = deletion_curve(self.model, run.inputs, importance_map(attributions), torch.tensor([target]),
                               steps=steps)
        return {"deletion_auc": round(float(curve.auc[0]), 4)}
