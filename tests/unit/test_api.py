"""The public API's contract: typed errors, registry rules, third-party explainers."""

import pytest
import torch

import explainers
from explainers import registry
from explainers.errors import DuplicateExplainerError, PluginError
from support.models import ModuleReluNet, seeded


@pytest.fixture
def model():
    return seeded(ModuleReluNet(classes=4))


@pytest.fixture
def x():
    return torch.randn(2, 3, 16, 16)


@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))


@pytest.mark.parametrize("target", [4, -1, [0, 4], torch.tensor([0, 9])])
def test_target_out_of_range(model, x, target):
    with pytest.raises(explainers.InvalidTargetError, match="out of range"):
        explainers.create("saliency", model).explain(x, target=target)


@pytest.mark.parametrize("target", [1.5, "circle", True, [0], [0, 1, 2], [0, 1.0], torch.tensor([0.0, 1.0]),
                                    torch.tensor([[0, 1]]), {0: 1}])
def test_target_of_wrong_type_or_length(model, x, target):
    with pytest.raises(explainers.InvalidTargetError):
        explainers.create("integrated_gradients", model).explain(x, target=target)


def test_target_forms_agree(model, x):
    by_int = explainers.create("saliency", model).explain(x, target=2)
    for same in ([2, 2], (2, 2), torch.tensor([2, 2]), torch.tensor(2)):
        other = explainers.create("saliency", model).explain(x, target=same)
        assert other.target.tolist() == [2, 2]
        torch.testing.assert_close(other.attributions, by_int.attributions)


@pytest.mark.parametrize("inputs", [torch.zeros(3, 16, 16), torch.zeros(2, 3, 16, 16, dtype=torch.long),
                                    torch.zeros(0, 3, 16, 16), torch.full((1, 3, 16, 16), float("nan")),
                                    [[0.0]], None])
def test_bad_inputs(model, inputs):
    with pytest.raises(explainers.InvalidInputError):
        explainers.create("guided_backprop", model).explain(inputs)


def test_typed_errors_are_builtin_subclasses():
    assert issubclass(explainers.InvalidTargetError, ValueError)
    assert issubclass(explainers.InvalidInputError, ValueError)
    assert issubclass(explainers.UnknownExplainerError, KeyError)
    for error in (explainers.InvalidTargetError, explainers.InvalidInputError, explainers.UnknownExplainerError):
        assert issubclass(error, PluginError)


def test_unknown_name_lists_available(model):
    with pytest.raises(explainers.UnknownExplainerError) as caught:
        explainers.create("lime", model)
    assert all(name in str(caught.value) for name in explainers.available())
    with pytest.raises(KeyError):
        explainers.predict_and_explain(model, torch.randn(1, 3, 16, 16), ["saliency", "nope"])


def test_bad_options(model, x):
    with pytest.raises(explainers.InvalidOptionError, match="n_step"):
        explainers.create("integrated_gradients", model, n_step=3)
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(explainers.InvalidOptionError):
            explainers.create("integrated_gradients", model, n_steps=bad)
    with pytest.raises(explainers.InvalidOptionError, match="layer"):
        explainers.create("grad_cam", model, layer="no.such.layer").explain(x)
    with pytest.raises(explainers.InvalidOptionError, match="larger than the input"):
        explainers.create("occlusion", model, window=32).explain(x)
    with pytest.raises(explainers.InvalidOptionError, match="twice"):
        explainers.predict_and_explain(model, x, ["saliency", "saliency"])
    with pytest.raises(explainers.InvalidOptionError, match="not requested"):
        explainers.predict_and_explain(model, x, ["saliency"], occlusion={"window": 4})
    with pytest.raises(explainers.InvalidOptionError):
        explainers.predict_and_explain(model, x, "saliency")


def test_third_party_explainer(isolated_registry, model, x):
    @explainers.register("input_squared")
    class InputSquared(explainers.Explainer):
        def __init__(self, model, *, power: int = 2):
            super().__init__(model)
            self.power = power

        def attribute(self, inputs, targets):
            return inputs ** self.power

    assert "input_squared" in explainers.available()
    out = explainers.create("input_squared", model, power=3).explain(x, target=1)
    assert out.method == "input_squared" and out.target.tolist() == [1, 1]
    torch.testing.assert_close(out.attributions, x ** 3)
    _, maps = explainers.predict_and_explain(model, x, ["guided_backprop", "input_squared"])
    torch.testing.assert_close(maps["input_squared"].attributions, x ** 2)


def test_registration_rules(isolated_registry):
    with pytest.raises(DuplicateExplainerError):
        @explainers.register("saliency")
        class Again(explainers.Explainer):
            def attribute(self, inputs, targets):
                return inputs

    with pytest.raises(TypeError):
        @explainers.register("not_an_explainer")
        class Plain:
            def attribute(self, inputs, targets):
                return inputs

    with pytest.raises(TypeError):
        @explainers.register("abstract")
        class Abstract(explainers.Explainer):
            pass
    assert "abstract" not in explainers.available() and "not_an_explainer" not in explainers.available()
