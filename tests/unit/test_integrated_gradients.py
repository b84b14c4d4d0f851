"""Our Integrated Gradients kernel against Captum, and the graph rewrites it and the rule models use."""

import pytest
import torch
from captum.attr import IntegratedGradients
from torch import nn

import explainers
from explainers.hygiene import explanation_mode
from explainers.methods.integrated_gradients import affine_split
from explainers.kernels.batchnorm import eval_batch_norm
from explainers.kernels.rules import rule_relu, rule_relu_
from explainers.kernels.tracing import trace_rule_model
from support.models import MixedReluNet, ModuleReluNet, TinyResNet, randomise_batchnorm, seeded


def assert_close(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-6 * float(expected.abs().max()))


@pytest.fixture
def batch():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))


class UntraceableModuleReluNet(ModuleReluNet):
    def forward(self, x):
        if x.sum() > -1e9:  # a Python branch on a tensor value: fx cannot trace it
            return super().forward(x)
        return super().forward(-x)


def captum_ig(model, batch, targets, **options):
    return IntegratedGradients(model).attribute(batch.clone(), target=targets, **options)


@pytest.mark.parametrize("method", ["riemann_middle", "riemann_trapezoid", "gausslegendre"])
@pytest.mark.parametrize("internal_batch_size", [None, 3, 7, 100])
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_equals_captum_on_a_residual_model_with_batch_norm(batch, method, internal_batch_size, memory_format):
    model = randomise_batchnorm(seeded(TinyResNet()))
    targets = torch.tensor([2, 0, 1])
    ours = explainers.create("integrated_gradients", model, n_steps=10, baseline=0.25, method=method,
                             internal_batch_size=internal_batch_size, memory_format=memory_format)
    theirs = captum_ig(model, batch, targets, baselines=0.25, n_steps=10, method=method,
                       internal_batch_size=internal_batch_size)
    if method == "riemann_trapezoid":
        theirs = theirs * 10 / 9  # Captum's trapezoid weights sum to (n-1)/n; ours to 1 (same points)
    assert_close(ours.explain(batch, target=targets).attributions, theirs)


@pytest.mark.parametrize("model_class", [ModuleReluNet, UntraceableModuleReluNet])
def test_equals_captum_with_and_without_a_traced_graph(batch, model_class):
    model = seeded(model_class())
    targets = torch.tensor([1, 3, 0])
    ours = explainers.create("integrated_gradients", model, n_steps=12, internal_batch_size=6)
    theirs = captum_ig(model, batch, targets, baselines=0.0, n_steps=12, internal_batch_size=6, method="riemann_middle")
    assert_close(ours.explain(batch, target=targets).attributions, theirs)


@pytest.mark.parametrize("method", ["riemann_middle", "riemann_trapezoid", "gausslegendre"])
def test_completeness_through_the_affine_prefix(batch, method):
    model = randomise_batchnorm(seeded(TinyResNet()))
    targets = torch.tensor([0, 2, 3])
    attributions = explainers.create("integrated_gradients", model, n_steps=64, internal_batch_size=16,
                                     method=method).explain(batch, target=targets).attributions
    with torch.no_grad():
        rows = torch.arange(3)
        delta = model(batch)[rows, targets] - model(torch.zeros_like(batch))[rows, targets]
    assert torch.all((attributions.sum(dim=(1, 2, 3)) - delta).abs() <= 0.01 * delta.abs()), (attributions.sum((1, 2, 3)), delta)


def test_result_is_contiguous_and_the_model_is_left_alone(batch):
    model = randomise_batchnorm(seeded(TinyResNet()))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    out = explainers.create("integrated_gradients", model, n_steps=4, memory_format="channels_last").explain(batch)
    assert out.attributions.is_contiguous()
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_memory_format_option_is_validated():
    with pytest.raises(explainers.InvalidOptionError):
        explainers.create("integrated_gradients", seeded(ModuleReluNet()), memory_format="nhwc")


def test_affine_prefix_is_found_where_the_input_meets_only_affine_layers(batch):
    resnet = seeded(TinyResNet())
    with explanation_mode(resnet):
        prefix, rest = affine_split(resnet, batch)
        assert prefix.layers == (resnet.stem, resnet.bn)
        with torch.no_grad():
            assert_close(rest(prefix(batch)), resnet(batch))
    with explanation_mode(resnet):
        resnet.bn.train()  # batch statistics: not affine
        prefix, _ = affine_split(resnet, batch)
        assert prefix.layers == (resnet.stem,)

    class ReluFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x):
            return self.conv(torch.relu(x)).mean(dim=(2, 3))

    assert affine_split(ReluFirst(), batch) == (None, None)


def test_eval_batch_norm_equals_the_module_and_defers_to_it_otherwise():
    bn = randomise_batchnorm(nn.Sequential(nn.BatchNorm2d(4)))[0].eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 4, 5, 5)
    assert_close(eval_batch_norm(bn, x), bn(x))
    bn.train()
    training_output = eval_batch_norm(bn, x)  # batch statistics, running stats updated: the module's own
    bn.eval()
    assert not torch.allclose(training_output, bn(x))
    calls = []
    handle = bn.register_forward_hook(lambda *_: calls.append(1))
    try:
        eval_batch_norm(bn, x)
    finally:
        handle.remove()
    assert calls == [1]  # a hooked module runs itself, so its hooks fire


def test_in_place_relus_stay_in_place_only_where_autograd_allows_it():
    def relu_calls(model):
        graph = trace_rule_model(model).graph
        return [node.target for node in graph.nodes if node.target in (rule_relu, rule_relu_)]

    # TinyResNet: every in-place ReLU follows a batch norm or a residual sum.
    assert set(relu_calls(seeded(TinyResNet()))) == {rule_relu_}
    # MixedReluNet: torch.relu_(g + 0.1) may stay in place; the shared in-place ReLU right after it
    # would overwrite the output the first ReLU saved, so it runs out of place.
    calls = relu_calls(seeded(MixedReluNet()))
    assert calls.count(rule_relu_) >= 1 and calls[-2:] == [rule_relu, rule_relu]
