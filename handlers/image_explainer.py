"""TorchServe handler: image classification with explanations on request.

A thin adapter: it loads the model and settings, turns TorchServe's request list and context into
the explainer layer's requests, and sets each reply's status. All logic lives in ``explainers``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from explainers.metrics import Metrics, TorchServeRecorder
from explainers.serving.requests import RawRequest
from explainers.serving.service import ExplanationService
from explainers.serving.settings import ServingSettings
from handlers.model_loading import load_eager_model
from ts.metrics.metric_type_enum import MetricTypes

logger = logging.getLogger(__name__)


class ImageExplainerHandler:
    def __init__(self):
        self.service: ExplanationService | None = None
        self.initialized = False

    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        gpu_id = properties.get("gpu_id")
        device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")
        manifest = context.manifest["model"]
        model = load_eager_model(model_dir / manifest["modelFile"], model_dir / manifest["serializedFile"], device)
        settings = ServingSettings.from_mapping((context.model_yaml_config or {}).get("handler", {}), model_dir)
        recorder = TorchServeRecorder(context.metrics, context.model_name, MetricTypes.COUNTER, MetricTypes.HISTOGRAM)
        self.service = ExplanationService(model, settings, Metrics(recorder))
        self.initialized = True
        logger.info("model %s loaded on %s", context.model_name, device)

    def handle(self, data, context):
        requests = []
        for index, fields in enumerate(data):
            headers = context.get_all_request_header(index) or {}
            # TorchServe marks requests that came through /explanations with the header explain=True.
            explain_route = str(headers.get("explain", "")).lower() == "true"
            requests.append(RawRequest(fields=fields, headers=headers, explain_route=explain_route))
        replies = self.service.handle(requests)
        for index, reply in enumerate(replies):
            if reply.status != 200:
                context.set_response_status(reply.status, reply.body["error"]["code"], index)
        return [reply.body for reply in replies]
