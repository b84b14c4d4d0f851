"""The caches and shortcuts the performance work added stay exact when what they cache changes."""

import torch
from torch import nn

import explainers
from explainers.hygiene import explanation_mode
from serving.metrics import prometheus_metrics
from explainers.kernels.batchnorm import eval_batch_norm
from serving.service import Reply
from support.models import TinyResNet, randomise_batchnorm, seeded


def test_eval_batch_norm_follows_changes_to_statistics_and_weights():
    bn = randomise_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))[0].eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(eval_batch_norm(bn, x), bn(x))
    with torch.no_grad():
        bn.running_var.mul_(3.0)        # in place: a new version
        bn.weight.add_(0.5)
    torch.testing.assert_close(eval_batch_norm(bn, x), bn(x))
    bn.load_state_dict({**bn.state_dict(), "running_mean": torch.full((3,), 2.0)})
    torch.testing.assert_close(eval_batch_norm(bn, x), bn(x))
    bn.bias = nn.Parameter(torch.full((3,), -1.0))  # a replaced tensor
    torch.testing.assert_close(eval_batch_norm(bn, x), bn(x))


def test_explanations_follow_weight_updates_between_calls():
    model = randomise_batchnorm(seeded(TinyResNet()))
    x = torch.randn(2, 3, 16, 16)
    explainers.predict_and_explain(model, x, ["saliency"])
    with torch.no_grad():
        model.bn.running_var.mul_(2.0)
        model.block1.bn2.weight.mul_(-1.0)
    logits, _ = explainers.predict_and_explain(model, x, ["saliency"])
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))


def test_explanation_mode_leaves_eval_models_alone_and_restores_training_ones():
    model = seeded(TinyResNet())  # eval
    with explanation_mode(model):
        assert not any(module.training for module in model.modules())
    assert not any(module.training for module in model.modules())
    model.train()
    model.block1.bn1.eval()
    with explanation_mode(model):
        assert not any(module.training for module in model.modules())
    assert model.training and not model.block1.bn1.training and model.block2.training


def test_request_counters_count_every_reply_once_per_batch():
    metrics = prometheus_metrics()
    replies = [Reply(200, {}, "predict"), Reply(200, {}, "predict"), Reply(400, {}, "predict"), Reply(200, {}, "explain")]
    metrics.requests(replies)
    registry = metrics.recorder.registry
    value = lambda route, outcome: registry.get_sample_value(  # noqa: E731
        "xai_requests_total", {"route": route, "outcome": outcome})
    assert value("predict", "ok") == 2 and value("predict", "client_error") == 1 and value("explain", "ok") == 1
