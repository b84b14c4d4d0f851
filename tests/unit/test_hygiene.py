"""An explanation never changes the model, also when it fails, and threads do not interfere."""

import threading

import pytest
import torch
from torch import nn

import explainers
from explainers.kernels.rules import active_selector
from support.models import MixedReluNet, ModuleReluNet, TinyResNet, UntraceableNet, seeded
from support.reference_rules import reference_attribution

OPTIONS = {"occlusion": {"window": 8}, "smoothgrad": {"samples": 2}, "integrated_gradients": {"n_steps": 4},
           "score_cam": {"layer": "block2", "max_channels": 4, "batch_size": 2},
           "ablation_cam": {"layer": "block2", "max_channels": 4, "batch_size": 2}, "eigen_cam": {"layer": "block2"}}
# Methods without a backward fail in a forward instead: occlusion and Score-CAM in their own forwards
# (they run the model itself), Eigen-CAM and Ablation-CAM in the shared forward with the layer captured
# (Ablation-CAM's own forwards run the traced graph, where the tripwire is frozen: see
# test_perturbation_cams for a failure inside them).
TRIPWIRES = {"occlusion": ("forward", 1), "score_cam": ("forward", 3), "eigen_cam": ("forward", 1),
             "ablation_cam": ("forward", 1)}


def model_state(model: nn.Module) -> dict:
    state = {}
    for name, module in model.named_modules():
        state[f"{name}:training"] = module.training
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            state[f"{name}:{hooks}"] = len(getattr(module, hooks))
    for name, parameter in model.named_parameters():
        state[f"{name}:requires_grad"] = parameter.requires_grad
        state[f"{name}:grad"] = parameter.grad
        state[f"{name}:value"] = parameter.detach().clone()
    for name, buffer in model.named_buffers():
        state[f"{name}:buffer"] = buffer.clone()
    state["grad_enabled"] = torch.is_grad_enabled()
    state["torch_function_modes"] = torch._C._len_torch_function_stack()
    state["rule_selector"] = active_selector()
    return state


def assert_same_state(before: dict, after: dict):
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("injected failure in the backward pass")


class Tripwire(nn.Module):
    """Fails the explanation in the backward pass, or in the forward after a number of calls."""

    def __init__(self, fail_in: str, forwards_before_failure: int = 0):
        super().__init__()
        self.fail_in, self.remaining = fail_in, forwards_before_failure

    def forward(self, x):
        if self.fail_in == "forward":
            if self.remaining == 0:
                raise RuntimeError("injected failure in the forward pass")
            self.remaining -= 1
            return x
        return _FailInBackward.apply(x)


def half_trained_resnet(tripwire: nn.Module | None = None) -> nn.Module:
    """A residual model in training mode, some BN layers in eval, some parameters frozen."""
    model = seeded(TinyResNet()).train()
    model.block1.bn1.eval()
    model.stem.weight.requires_grad_(False)
    if tripwire is not None:
        model.fc = nn.Sequential(tripwire, model.fc)  # every backward, Grad-CAM's too, passes here
    return model


@pytest.mark.parametrize("name", explainers.available())
def test_model_state_unchanged_after_explaining(name):
    model = half_trained_resnet()
    before = model_state(model)
    explainers.create(name, model, **OPTIONS.get(name, {})).explain(torch.randn(2, 3, 16, 16))
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("name", explainers.available())
def test_model_state_unchanged_when_the_explanation_raises(name):
    tripwire = Tripwire(*TRIPWIRES.get(name, ("backward",)))
    model = half_trained_resnet(tripwire)
    before = model_state(model)
    # LRP refuses a model with a custom autograd.Function (its rules need the traced layers): it
    # fails after the prediction's forward, before any backward.
    error, message = ((explainers.errors.UnsupportedModelError, "custom autograd.Function") if name == "lrp"
                      else (RuntimeError, "injected failure"))
    with torch.no_grad():
        with pytest.raises(error, match=message):
            explainers.create(name, model, **OPTIONS.get(name, {})).explain(torch.randn(2, 3, 16, 16))
    assert_same_state(before, model_state(model))


def test_explaining_inside_no_grad_and_inference_mode():
    model = seeded(ModuleReluNet())
    x = torch.randn(2, 3, 16, 16)
    expected = explainers.create("guided_backprop", model).explain(x).attributions
    with torch.inference_mode():
        inference_input = x.clone()
        got = explainers.create("guided_backprop", model).explain(inference_input).attributions
    torch.testing.assert_close(got, expected)


def test_concurrent_threads_get_correct_results_and_plain_autograd_is_unaffected():
    traced, fallback, bystander = seeded(MixedReluNet(), 1), seeded(UntraceableNet(), 2), seeded(ModuleReluNet(), 3)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    targets = torch.tensor([0, 1, 2, 3])
    expected = {
        id(traced): reference_attribution(traced, x, targets, "guided_backprop"),
        id(fallback): reference_attribution(fallback, x, targets, "deconvnet"),
    }
    x_plain = x.clone().requires_grad_(True)
    expected_plain = torch.autograd.grad(bystander(x_plain)[:, 1].sum(), x_plain)[0]
    failures, start = [], threading.Barrier(3)

    def recording_failures(work):
        # An exception in a thread never reaches pytest on its own: record it as a failure.
        def run(*args):
            try:
                work(*args)
            except BaseException as error:
                failures.append(f"{work.__name__}: {type(error).__name__}: {error}")
        return run

    @recording_failures
    def explain(model, method):
        start.wait()
        for _ in range(15):
            got = explainers.create(method, model).explain(x, target=targets).attributions
            if not torch.allclose(got, expected[id(model)], rtol=1e-5, atol=1e-6):
                failures.append(method)

    @recording_failures
    def plain_autograd():
        start.wait()
        for _ in range(30):
            inputs = x.clone().requires_grad_(True)
            gradient = torch.autograd.grad(bystander(inputs)[:, 1].sum(), inputs)[0]
            if not torch.allclose(gradient, expected_plain):
                failures.append("plain autograd")

    threads = [threading.Thread(target=explain, args=(traced, "guided_backprop")),
               threading.Thread(target=explain, args=(fallback, "deconvnet")),
               threading.Thread(target=plain_autograd)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_one_training_model_explained_from_two_threads_stays_in_eval_throughout():
    model = half_trained_resnet()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model.eval()
        expected_logits = model(x)
        model.train()
        model.block1.bn1.eval()
    before = model_state(model)
    results, start = [], threading.Barrier(2)

    def explain():
        start.wait()
        for _ in range(10):
            logits, _ = explainers.predict_and_explain(model, x, ["saliency"])
            results.append(torch.allclose(logits, expected_logits, atol=1e-5))

    threads = [threading.Thread(target=explain) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results and all(results)
    assert_same_state(before, model_state(model))


def test_tracing_a_model_does_not_disturb_modules_running_in_other_threads():
    """torch.fx patches nn.Module.__call__ process-wide while it traces; other threads must not notice."""
    bystander = seeded(ModuleReluNet(), 4)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = bystander(x)
    stop, errors, runs = threading.Event(), [], []

    def keep_running():
        try:
            while not stop.is_set():
                with torch.no_grad():
                    runs.append(torch.allclose(bystander(x), expected))
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=keep_running)
    thread.start()
    try:
        for seed in range(8):  # each new model is traced once, while the bystander keeps running
            explainers.create("guided_backprop", seeded(TinyResNet(), seed)).explain(x)
    finally:
        stop.set()
        thread.join()
    assert errors == [] and runs and all(runs)
