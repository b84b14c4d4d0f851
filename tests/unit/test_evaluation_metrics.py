"""Quality metrics against hand-computed cases and slow, plain references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import explainers
from explainers import registry
from explainers.errors import InvalidInputError, InvalidOptionError, InvalidTargetError
from explainers.evaluation import (
    blurred_baseline,
    cascade_layers,
    class_map_similarity,
    deletion_curve,
    image_map_similarity,
    importance_map,
    insertion_curve,
    mask_energy,
    pointing_game,
    randomization_cascade,
    rank_similarity,
    spearman,
)
from explainers.evaluation.randomization import randomize_layer
from demo.allconv import AllConvNet
from support.models import ModuleReluNet, seeded


def sigmoid(value: float) -> float:
    return 1 / (1 + math.exp(-value))


def trapezoid(values: list[float]) -> float:
    """Area under equally spaced values over [0, 1], written out."""
    width = 1 / (len(values) - 1)
    return sum((left + right) / 2 * width for left, right in zip(values, values[1:]))


# --- ranks and similarity -------------------------------------------------------------------


def reference_spearman(first: list[float], second: list[float]) -> float:
    """Spearman's rho the textbook way: average ranks for ties, then Pearson's r of the ranks."""

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        position = 0
        while position < len(order):
            end = position
            while end + 1 < len(order) and values[order[end + 1]] == values[order[position]]:
                end += 1
            for k in range(position, end + 1):
                result[order[k]] = (position + end) / 2 + 1
            position = end + 1
        return result

    a, b = ranks(first), ranks(second)
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    covariance = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    return covariance / math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))


def test_spearman_matches_the_textbook_formula_with_ties():
    generator = torch.Generator().manual_seed(3)
    first = torch.randint(0, 5, (6, 7, 9), generator=generator).float()  # many ties
    second = first + torch.randint(-2, 3, (6, 7, 9), generator=generator).float()
    observed = spearman(first, second)
    for row in range(6):
        expected = reference_spearman(first[row].flatten().tolist(), second[row].flatten().tolist())
        assert observed[row].item() == pytest.approx(expected, abs=1e-12)


def test_spearman_hand_cases_and_constant_maps():
    ramp = torch.arange(12.0).view(1, 3, 4)
    assert spearman(ramp, ramp.exp()).item() == pytest.approx(1.0)  # any increasing transform
    assert spearman(ramp, -ramp).item() == pytest.approx(-1.0)
    constant = torch.zeros(1, 3, 4)
    assert math.isnan(spearman(ramp, constant).item())
    # A constant map keeps none of the other's ranking: 0; two constant maps say nothing: NaN.
    assert rank_similarity(ramp, constant).item() == 0.0
    assert rank_similarity(constant, ramp).item() == 0.0
    assert math.isnan(rank_similarity(constant, constant).item())
    with pytest.raises(InvalidInputError):
        spearman(ramp, ramp[:, :2])


def test_importance_map_is_the_channel_sum_of_magnitudes():
    attributions = torch.tensor([[[[1.0, -2.0]], [[-3.0, 0.5]], [[0.0, 1.0]]]])  # [1, 3, 1, 2]
    assert importance_map(attributions).tolist() == [[[4.0, 3.5]]]
    cam = torch.rand(2, 1, 4, 4)
    assert torch.equal(importance_map(cam), cam[:, 0])
    with pytest.raises(InvalidInputError):
        importance_map(torch.ones(3, 4, 4))


# --- deletion and insertion -----------------------------------------------------------------


class ObjectEvidence(nn.Module):
    """Two classes: logit 0 is the sum of the object's pixels, logit 1 is 0. Only object pixels
    can change the score, so a map's ranking of them fixes the whole curve."""

    def __init__(self, object_mask: torch.Tensor):
        super().__init__()
        self.register_buffer("weights", object_mask.float())

    def forward(self, x):
        evidence = (x[:, 0] * self.weights).flatten(1).sum(dim=1)
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)


@pytest.fixture
def four_pixel_object():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1:3, 1:3] = True  # 4 object pixels of 16, each worth one logit
    image = mask.float().view(1, 1, 4, 4)
    return ObjectEvidence(mask), image, mask


def test_deletion_auc_hand_computed(four_pixel_object):
    model, image, mask = four_pixel_object
    target = torch.tensor([0])
    # One pixel per step. The right map removes the 4 object pixels first: p_t = sigmoid(4 - min(t, 4)).
    right = deletion_curve(model, image, mask.float()[None], target, steps=16)
    expected_right = [sigmoid(4 - min(t, 4)) for t in range(17)]
    assert right.probabilities[0].tolist() == pytest.approx(expected_right, abs=1e-6)
    assert right.fractions.tolist() == pytest.approx([t / 16 for t in range(17)])
    assert right.auc.item() == pytest.approx(trapezoid(expected_right), abs=1e-6)
    # The inverted map removes them last: flat at sigmoid(4) for 12 steps, then down.
    wrong = deletion_curve(model, image, (~mask).float()[None], target, steps=16)
    expected_wrong = [sigmoid(4 - max(0, t - 12)) for t in range(17)]
    assert wrong.auc.item() == pytest.approx(trapezoid(expected_wrong), abs=1e-6)
    assert right.auc.item() < wrong.auc.item()
    # Four pixels per step: the whole object goes at the first step.
    coarse = deletion_curve(model, image, mask.float()[None], target, steps=4)
    assert coarse.probabilities[0].tolist() == pytest.approx([sigmoid(4)] + [0.5] * 4, abs=1e-6)


def test_insertion_auc_hand_computed(four_pixel_object):
    model, image, mask = four_pixel_object
    curve = insertion_curve(model, image, mask.float()[None], torch.tensor([0]), baseline=torch.zeros_like(image), steps=16)
    expected = [sigmoid(min(t, 4)) for t in range(17)]
    assert curve.probabilities[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert curve.auc.item() == pytest.approx(trapezoid(expected), abs=1e-6)


def slow_curve(model, start, end, importance, target, steps):
    """One image, one forward per step, pixels copied one at a time in a plain loop."""
    height, width = importance.shape
    pixels = height * width
    order = sorted(range(pixels), key=lambda p: (-importance.flatten()[p].item(), p))
    probabilities = []
    for k in range(steps + 1):
        frame = start.clone()
        for p in order[: round(k * pixels / steps)]:
            frame[:, p // width, p % width] = end[:, p // width, p % width]
        with torch.no_grad():
            probabilities.append(torch.softmax(model(frame[None]), dim=1)[0, target].item())
    return probabilities


def test_batched_curves_match_a_plain_loop():
    model = seeded(ModuleReluNet(classes=4))
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 3, 8, 8, generator=generator)
    importance = torch.randint(0, 6, (5, 8, 8), generator=generator).float()  # ties: raster order decides
    targets = torch.tensor([0, 3, 1, 2, 0])
    baseline = blurred_baseline(inputs, 1.5)
    # batch_size 12 with 5 steps: two images per forward pass, so chunks of 2, 2 and 1.
    deletion = deletion_curve(model, inputs, importance, targets, baseline=baseline, steps=5, batch_size=12)
    insertion = insertion_curve(model, inputs, importance, targets, baseline=baseline, steps=5, batch_size=12)
    for row in range(5):
        expected = slow_curve(model, inputs[row], baseline[row], importance[row], int(targets[row]), 5)
        assert deletion.probabilities[row].tolist() == pytest.approx(expected, abs=1e-5)
        expected = slow_curve(model, baseline[row], inputs[row], importance[row], int(targets[row]), 5)
        assert insertion.probabilities[row].tolist() == pytest.approx(expected, abs=1e-5)
    assert ((deletion.auc >= 0) & (deletion.auc <= 1)).all()


def test_curves_leave_the_model_as_it_was_and_reject_bad_arguments():
    model = seeded(ModuleReluNet(classes=4)).train()
    state = copy.deepcopy(model.state_dict())
    inputs = torch.randn(2, 3, 8, 8)
    importance = torch.rand(2, 8, 8)
    deletion_curve(model, inputs, importance, torch.tensor([0, 1]), steps=4)
    assert model.training and all(module.training for module in model.modules())
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    with pytest.raises(InvalidOptionError):
        deletion_curve(model, inputs, importance, torch.tensor([0, 1]), steps=65)  # more steps than pixels
    with pytest.raises(InvalidOptionError):
        deletion_curve(model, inputs, importance, torch.tensor([0, 1]), steps=0)
    with pytest.raises(InvalidInputError):
        deletion_curve(model, inputs, importance[:, :4], torch.tensor([0, 1]))
    with pytest.raises(InvalidTargetError):
        deletion_curve(model, inputs, importance, torch.tensor([0, 4]), steps=4)


def test_blurred_baseline_is_a_normalised_gaussian():
    impulse = torch.zeros(1, 1, 21, 21)
    impulse[0, 0, 10, 10] = 1.0
    blurred = blurred_baseline(impulse, 1.0)[0, 0]
    window = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)]  # radius ceil(3 sigma)
    total = sum(math.exp(-(dy * dy + dx * dx) / 2) for dy, dx in window)
    for dy, dx in [(0, 0), (1, 0), (2, 1), (3, 3)]:
        assert blurred[10 + dy, 10 + dx].item() == pytest.approx(math.exp(-(dy * dy + dx * dx) / 2) / total, rel=1e-5)
    assert blurred[10, 14].item() == 0.0
    flat = torch.full((2, 3, 9, 9), 0.7)
    assert torch.allclose(blurred_baseline(flat, 2.0), flat)  # replicated borders keep a flat image flat
    with pytest.raises(InvalidOptionError):
        blurred_baseline(flat, 0)


# --- localisation ---------------------------------------------------------------------------


def test_pointing_game_hand_cases():
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 2:4, 2:4] = True
    inside = torch.zeros(1, 6, 6)
    inside[0, 3, 3] = 1.0
    beside = torch.zeros(1, 6, 6)
    beside[0, 3, 4] = 1.0  # one pixel right of the object
    diagonal = torch.zeros(1, 6, 6)
    diagonal[0, 4, 4] = 1.0  # sqrt(2) from the object
    assert pointing_game(inside, mask).item() == 1.0
    assert pointing_game(beside, mask).item() == 0.0
    assert pointing_game(beside, mask, tolerance=1).item() == 1.0
    assert pointing_game(diagonal, mask, tolerance=1).item() == 0.0
    assert pointing_game(diagonal, mask, tolerance=1.5).item() == 1.0
    tied = inside + beside  # two maxima, one on the object
    assert pointing_game(tied, mask).item() == 0.5
    assert pointing_game(torch.ones(1, 6, 6), mask).item() == pytest.approx(4 / 36)  # chance level
    batch = torch.cat([inside, beside])
    assert pointing_game(batch, mask.expand(2, 6, 6)).tolist() == [1.0, 0.0]
    with pytest.raises(InvalidOptionError):
        pointing_game(inside, mask, tolerance=-1)
    with pytest.raises(InvalidInputError):
        pointing_game(inside, mask[:, :5])


def test_mask_energy_hand_cases():
    importance = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])
    mask = torch.tensor([[[True, False], [False, True]]])
    assert mask_energy(importance, mask).item() == pytest.approx((1 + 4) / (1 + 3 + 4))
    signed = torch.tensor([[[-5.0, 1.0], [1.0, 2.0]]])  # only positive mass is shared out
    assert mask_energy(signed, mask).item() == pytest.approx(2 / 4)
    assert math.isnan(mask_energy(torch.zeros(1, 2, 2), mask).item())


# --- class and input sensitivity ------------------------------------------------------------


class LinearClassifier(nn.Module):
    """logits = W x: the gradient for class c is W_c whatever the image, so every map is known."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(weights[0].numel(), len(weights), bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(weights.flatten(1))

    def forward(self, x):
        return self.linear(x.flatten(1))


def test_class_map_similarity_on_a_linear_model():
    pattern = torch.arange(1.0, 17.0).view(1, 4, 4)
    # Class 1's evidence is class 0's, opposite in sign and twice as strong; class 2's is reversed in rank.
    weights = torch.stack([pattern, -2 * pattern, 17.0 - pattern])
    model = LinearClassifier(weights[:2]).eval()
    image = torch.ones(1, 1, 4, 4) * 0.01  # logits 1.36, -2.72: top class 0, least likely class 1
    result = class_map_similarity(explainers.create("saliency", model), image)
    assert result.top.target.tolist() == [0] and result.least.target.tolist() == [1]
    assert torch.equal(result.top.attributions[0], weights[0])
    # |W_1| = 2 |W_0|: the same ranking, so the magnitude maps call saliency class-insensitive here...
    assert result.similarity.item() == pytest.approx(1.0)
    # ... while the signed maps are exact opposites.
    assert result.signed_similarity.item() == pytest.approx(-1.0)
    flipped = -image  # logits -1.36, 2.72: top class 1, least likely class 0
    result = class_map_similarity(explainers.create("saliency", model), flipped)
    assert result.least.target.tolist() == [0] and result.similarity.item() == pytest.approx(1.0)
    sensitive = LinearClassifier(weights[[0, 2]]).eval()
    image = pattern.view(1, 1, 4, 4) / 100  # logits: sum p^2 > sum p (17 - p), so top class 0
    result = class_map_similarity(explainers.create("saliency", sensitive), image)
    assert result.top.target.tolist() == [0] and result.least.target.tolist() == [1]
    assert result.similarity.item() == pytest.approx(-1.0)  # class 2's ranking is class 0's reversed


def test_image_map_similarity_on_a_linear_model():
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 1, 5, 5, generator=generator)
    model = LinearClassifier(weights).eval()
    images = torch.rand(4, 1, 5, 5, generator=generator) + 0.5
    targets = torch.tensor([0, 1, 2, 0])
    # The gradient of a linear model ignores the image: the same map for every image of a class.
    saliency = image_map_similarity(explainers.create("saliency", model), images, targets)
    assert saliency.tolist() == pytest.approx([1.0] * 4)
    # Input x gradient follows the image: W_t * x_i against W_t * x_(i+1).
    observed = image_map_similarity(explainers.create("input_x_gradient", model), images, targets)
    for row in range(4):
        following = (row + 1) % 4
        expected = reference_spearman((weights[targets[row]] * images[row]).abs().flatten().tolist(),
                                      (weights[targets[row]] * images[following]).abs().flatten().tolist())
        assert observed[row].item() == pytest.approx(expected, abs=1e-9)
    with pytest.raises(InvalidInputError):
        image_map_similarity(explainers.create("saliency", model), images[:1], targets[:1])


# --- weight randomisation -------------------------------------------------------------------


def test_cascade_layers_of_the_demo_model_follow_execution_order_from_the_top():
    layers = cascade_layers(AllConvNet(), torch.randn(1, 3, 64, 64))
    assert layers == [("classifier",), ("features.15", "features.16"), ("features.12", "features.13"),
                      ("features.9", "features.10"), ("features.6", "features.7"), ("features.3", "features.4"),
                      ("features.0", "features.1")]

    class DefinedBackwards(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.norm = nn.BatchNorm1d(4)
            self.stem = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(torch.relu(self.norm(self.stem(x.flatten(1)))))

    # Definition order would put the head first and the norm with the head; execution order does not.
    assert cascade_layers(DefinedBackwards(), torch.randn(2, 3, 1, 1)) == [("head",), ("stem", "norm")]


def test_randomize_layer_redraws_only_the_named_modules_keeping_each_tensors_scale():
    model = AllConvNet()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.features[15].weight.mul_(3).add_(0.2)
        # Freshly built norms are constant (weight 1, bias 0), and a constant tensor redraws to
        # itself; give them a spread as training would.
        model.features[16].weight.add_(0.1 * torch.randn(64, generator=generator))
        model.features[16].bias.add_(0.1 * torch.randn(64, generator=generator))
    trained = copy.deepcopy(model.state_dict())
    randomize_layer(model, ("features.15", "features.16"), torch.Generator().manual_seed(0))
    state = model.state_dict()
    changed = {key for key in state if not torch.equal(state[key], trained[key])}
    assert changed == {"features.15.weight", "features.16.weight", "features.16.bias"}  # buffers kept
    old, new = trained["features.15.weight"], state["features.15.weight"]
    assert new.mean().item() == pytest.approx(old.mean().item(), abs=0.01)
    assert new.std().item() == pytest.approx(old.std().item(), rel=0.05)
    assert abs(reference_spearman(old.flatten().tolist()[:2000], new.flatten().tolist()[:2000])) < 0.1


@pytest.fixture
def image_echo(monkeypatch):
    """A registered explainer whose map is the image itself: it never reads the weights."""
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))

    @explainers.register("image_echo")
    class ImageEcho(explainers.Explainer):
        def attribute(self, inputs, targets):
            return inputs.clone()

    return "image_echo"


def test_randomization_cascade_hand_cases(image_echo):
    model = seeded(ModuleReluNet(classes=4))
    trained_state = copy.deepcopy(model.state_dict())
    inputs = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 1, 2])
    # A map that never reads the weights survives every step exactly.
    echo = randomization_cascade(model, image_echo, inputs, targets)
    assert echo.layers == ("head.4", "head.2", "features.5", "features.3", "features.0")
    assert echo.similarity.shape == (5, 3) and torch.allclose(echo.similarity, torch.ones(5, 3, dtype=torch.float64))
    # The gradient of a linear model is its weight row: after the one layer is redrawn, the
    # similarity is that of the trained and the redrawn row (same seed, same draw).
    generator = torch.Generator().manual_seed(5)
    linear = LinearClassifier(torch.randn(3, 1, 6, 6, generator=generator)).eval()
    images = torch.rand(2, 1, 6, 6, generator=generator)
    cascade = randomization_cascade(linear, "saliency", images, torch.tensor([0, 2]), seed=11)
    redrawn = copy.deepcopy(linear)
    randomize_layer(redrawn, ("linear",), torch.Generator().manual_seed(11))
    for row, target in enumerate([0, 2]):
        expected = reference_spearman(linear.linear.weight[target].abs().tolist(), redrawn.linear.weight[target].abs().tolist())
        assert cascade.similarity[0, row].item() == pytest.approx(expected, abs=1e-9)
    # The model explained is never touched.
    randomization_cascade(model, "saliency", inputs, targets)
    assert all(torch.equal(trained_state[key], value) for key, value in model.state_dict().items())


def test_cascade_with_fewer_steps_compares_at_evenly_spaced_layers_of_the_same_cascade():
    model = seeded(ModuleReluNet(classes=4))
    inputs = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([1, 3])
    full = randomization_cascade(model, "saliency", inputs, targets, seed=4)
    short = randomization_cascade(model, "saliency", inputs, targets, seed=4, max_steps=3)
    # Five layers, three comparisons: after the first, the third and the last layer (the layers
    # between are still randomised, with the same draws, so those steps equal the full cascade's).
    assert short.layers == (full.layers[0], full.layers[2], full.layers[4])
    torch.testing.assert_close(short.similarity, full.similarity[[0, 2, 4]])
    torch.testing.assert_close(short.step_maps, full.step_maps[[0, 2, 4]])
    assert randomization_cascade(model, "saliency", inputs, targets, seed=4, max_steps=9).layers == full.layers
    assert randomization_cascade(model, "saliency", inputs, targets, seed=4, max_steps=1).layers == (full.layers[-1],)
    with pytest.raises(InvalidOptionError, match="max_steps"):
        randomization_cascade(model, "saliency", inputs, targets, max_steps=0)
