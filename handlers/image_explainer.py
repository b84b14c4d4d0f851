"""TorchServe handler: image classification with explanations on request.

A thin adapter: it loads the model and settings, turns TorchServe's request list and context into
the request service's requests, and sets each reply's status. All logic lives in ``serving`` and
``explainers``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from ts.metrics.metric_type_enum import MetricTypes

from handlers.envelopes import ENVELOPES, reply_bodies_for, requests_from_instances
from handlers.model_loading import load_architecture, load_eager_model, model_class
from handlers.torchserve_metrics import TorchServeRecorder
from explainers.errors import UnsupportedModelError
from serving.metrics import Metrics
from serving.replies import internal_error_reply
from serving.requests import RawRequest
from serving.sanity import load_or_measure
from serving.service import ExplanationService
from serving.settings import ServingSettings
from serving.warmup import WarmUp, warm_up

logger = logging.getLogger(__name__)


# KServe's runtime sets this from the InferenceService's protocol, and TorchServe applies it as
# service_envelope when the server runs with enable_envvars_config=true (as the cluster config does).
ENVELOPE_VARIABLE = "TS_SERVICE_ENVELOPE"


def envelope_in_effect(configured: str | None, environment=os.environ) -> str | None:
    """The model config's envelope, else the one the environment gives TorchServe.

    One archive then serves both KServe protocols: the same .mar is behind a v1 and a v2
    InferenceService, and only the pod's environment says which envelope wraps the requests.
    """
    if configured:
        return configured
    value = environment.get(ENVELOPE_VARIABLE, "").strip()
    return value if value in ENVELOPES else None


def _is_describe_request(context) -> bool:
    # TorchServe sends GET /models/{m}?customized=true to the worker as a request with describe=True.
    headers = context.get_all_request_header(0) or {}
    return str(headers.get("describe", "")).lower() == "true"


def _is_explain_request(headers: dict) -> bool:
    # TorchServe marks requests to /explanations (and KServe :explain) with the header explain=True.
    return str(headers.get("explain", "")).lower() == "true"


class ImageExplainerHandler:
    def __init__(self):
        self.service: ExplanationService | None = None
        self.warm_up: WarmUp | None = None
        self.envelope: str | None = None
        self.initialized = False

    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        gpu_id = properties.get("gpu_id")
        device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")
        manifest = context.manifest["model"]
        # The model file first: it may register explainers that the settings name.
        defined = model_class(model_dir / manifest["modelFile"]) if manifest.get("modelFile") else None
        settings = ServingSettings.from_mapping((context.model_yaml_config or {}).get("handler", {}), model_dir)
        model = self._load_model(defined, manifest, settings, model_dir, device)
        recorder = TorchServeRecorder(context.metrics, context.model_name, MetricTypes.COUNTER, MetricTypes.HISTOGRAM,
                                      gauge_type=MetricTypes.GAUGE)
        # Stored in the archive, else measured now (the model's first explanations: a warm-up too).
        sanity = load_or_measure(model, settings, model_dir)
        self.service = ExplanationService(model, settings, Metrics(recorder), sanity=sanity)
        self.envelope = envelope_in_effect(settings.envelope)
        self.warm_up = warm_up(model, settings)
        if self.warm_up.ok:
            logger.info("model %s: %s", context.model_name, self.warm_up.describe())
        else:
            # Predictions do not depend on the explained path: keep serving them, and let each
            # explanation request answer for itself; the cause is logged here once, in full.
            logger.error("model %s: %s; predictions are served, explanations may fail", context.model_name,
                         self.warm_up.describe(), exc_info=self.warm_up.error)
        self.initialized = True
        logger.info("model %s loaded on %s (envelope: %s)", context.model_name, device, self.envelope or "none")

    @staticmethod
    def _load_model(defined: type | None, manifest: dict, settings: ServingSettings, model_dir: Path,
                    device: torch.device):
        """The archive's model: the architecture its settings name, else its model file."""
        weights = model_dir / manifest["serializedFile"]
        if settings.architecture is not None:
            return load_architecture(settings.architecture, settings.num_classes, weights, device)
        if defined is None:
            raise UnsupportedModelError(
                "the archive has no model file and its handler settings name no architecture: archive with "
                "--model-file, or with --torchvision/--timm NAME")
        return load_eager_model(defined, weights, device)

    def handle(self, data, context):
        try:
            return self._handle(data, context)
        except Exception:
            # TorchServe answers every request of the batch with 503 when handle() raises; a bug
            # here gets a typed 500 per request instead, and the worker keeps serving.
            logger.exception("unexpected error while handling a batch")
            reply = internal_error_reply()
            for index in range(len(data or [])):
                context.set_response_status(reply.status, reply.error_code, index)
            return [reply.body for _ in data or []]

    def describe_handle(self) -> str:
        """The model's custom metadata: the explainers a request may ask for, those the explanations
        route uses, and each allowed explainer's sanity checks on this model."""
        settings = self.service.settings
        return json.dumps({"allowed_explainers": list(settings.allowed),
                           "default_explainers": list(settings.default_explainers),
                           **self.service.sanity.describe()})

    def _handle(self, data, context):
        if _is_describe_request(context):
            return [self.describe_handle()]
        envelope = self.envelope
        if envelope:
            return self._handle_instances(envelope, data, context)
        requests = []
        for index, fields in enumerate(data):
            headers = context.get_all_request_header(index) or {}
            requests.append(RawRequest(fields=fields, headers=headers, explain_route=_is_explain_request(headers)))
        replies = self.service.handle(requests)
        for index, reply in enumerate(replies):
            if reply.error_code is not None:
                context.set_response_status(reply.status, reply.error_code, index)
        return [reply.body for reply in replies]

    def _handle_instances(self, envelope: str, instances, context):
        # TorchServe's KServe envelopes pass the instances of request 0 only: they are one request.
        headers = context.get_all_request_header(0) or {}
        requests = requests_from_instances(envelope, instances, headers, _is_explain_request(headers))
        replies = self.service.handle(requests)
        failed = [reply for reply in replies if reply.error_code is not None]
        if failed:
            context.set_response_status(failed[0].status, failed[0].error_code, 0)
        return reply_bodies_for(envelope, [reply.body for reply in replies])
