"""LRP against the plain-gradient floor on ResNet-50 (torchvision, random seeded weights).

Cases, interleaved round by round (see timing.interleaved):

- ``floor``: ``torch.autograd.grad(model(x).gather(1, top1).sum(), x)`` on the model itself;
- ``lrp``: ``predict_and_explain(model, x, ["lrp"])`` (composite ``epsilon_plus_flat``), prediction included;
- ``lrp_epsilon``: the same with the ``epsilon`` composite (no modified layer runs: reported, no goal).

Goal: median of the per-round ratio lrp / floor <= 1.3. z+ runs each convolution once more with its
positive weights (``z+ = W+ x``), which plain autograd never computes: about one forward of the
convolutions on top of the floor's forward and input-gradient backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import explainers

from .architectures import _reason, _synchronize, build_torchvision
from .timing import interleaved, ratio, summary_ms

GOAL = 1.3


@dataclass(frozen=True)
class LRPPlan:
    model: str
    batches: tuple[int, ...]
    size: int
    rounds: int
    budget_s: float


def plan_for(mode: str) -> LRPPlan:
    if mode == "smoke":
        return LRPPlan("resnet18", (1,), 64, rounds=2, budget_s=2)
    if mode == "quick":
        return LRPPlan("resnet50", (1,), 224, rounds=3, budget_s=20)
    return LRPPlan("resnet50", (1, 4), 224, rounds=7, budget_s=90)


def cases(model: nn.Module, inputs: torch.Tensor) -> dict[str, Callable[[], object]]:
    def floor():
        x = inputs.detach().clone().requires_grad_(True)
        logits = model(x)
        return torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), x)

    def lrp(composite):
        return lambda: explainers.predict_and_explain(model, inputs, ["lrp"], lrp={"composite": composite})

    return {"floor": floor, "lrp": lrp("epsilon_plus_flat"), "lrp_epsilon": lrp("epsilon")}


def run(plan: LRPPlan, device: torch.device, log=print, build: Callable[[str, int], nn.Module] = build_torchvision) -> dict:
    result: dict = {"model": plan.model, "input_size": [plan.size, plan.size], "rounds": plan.rounds,
                    "weights": "random (torchvision weights=None, seeded), batch norms calibrated on noise",
                    "batches": {}}
    try:
        model = build(plan.model, plan.size).to(device)
    except Exception as error:  # a torchvision without the model, a build that fails
        return {**result, "failed": _reason(error)}
    for batch in plan.batches:
        inputs = torch.randn(batch, 3, plan.size, plan.size, generator=torch.Generator().manual_seed(batch)).to(device)
        measured = cases(model, inputs)
        try:
            _, maps = measured["lrp"]()  # also builds the model's layer-site trace before the rounds
            _synchronize()
            log(f"[lrp {plan.model} b{batch}] rule sites {dict(maps['lrp'].rule_sites)} ({plan.rounds} rounds)")
            times = interleaved(measured, plan.rounds, warmup=1, budget_s=plan.budget_s)
        except Exception as error:
            result["batches"][str(batch)] = {"failed": _reason(error)}
            continue
        stats = ratio(times, "lrp", "floor")
        epsilon = ratio(times, "lrp_epsilon", "floor")
        result["batches"][str(batch)] = {
            "times_ms": {case: summary_ms(values) for case, values in times.items()},
            "lrp_over_floor": {"ratio": round(stats["median"], 3), "p25": round(stats["p25"], 3),
                               "p75": round(stats["p75"], 3),
                               "cpu_time_ratio": round(ratio(times.cpu, "lrp", "floor")["median"], 3),
                               "goal": f"<= {GOAL}", "status": "ok" if stats["median"] <= GOAL else "short",
                               "rounds": len(times["lrp"])},
            "lrp_epsilon_over_floor": {"ratio": round(epsilon["median"], 3), "p25": round(epsilon["p25"], 3),
                                       "p75": round(epsilon["p75"], 3)},
        }
    return result


def goal_rows(section: dict) -> list[dict]:
    """Rows of run.py's goal table: lrp / floor per batch (goal) and lrp(epsilon) / floor (reported)."""
    name = f"lrp {section.get('model', '?')}"
    if "failed" in section or "skipped" in section:
        return [{"model": name, "batch": None, "goal": "lrp_over_floor", "value": None, "p25": None, "p75": None,
                 "target": f"<= {GOAL}", "status": f"failed: {section.get('failed', section.get('skipped'))}",
                 "numerator_median_ms": None, "denominator_median_ms": None}]
    rows = []
    for batch, entry in section["batches"].items():
        if "failed" in entry:
            rows.append({"model": name, "batch": int(batch), "goal": "lrp_over_floor", "value": None, "p25": None,
                         "p75": None, "target": f"<= {GOAL}", "status": f"failed: {entry['failed']}",
                         "numerator_median_ms": None, "denominator_median_ms": None})
            continue
        times = entry["times_ms"]
        goal = entry["lrp_over_floor"]
        rows.append({"model": name, "batch": int(batch), "goal": "lrp_epsilon_plus_flat_over_floor",
                     "value": goal["ratio"], "p25": goal["p25"], "p75": goal["p75"],
                     "cpu_time_ratio": goal["cpu_time_ratio"], "target": goal["goal"], "status": goal["status"],
                     "numerator_median_ms": times["lrp"]["median"], "denominator_median_ms": times["floor"]["median"]})
        epsilon = entry["lrp_epsilon_over_floor"]
        rows.append({"model": name, "batch": int(batch), "goal": "lrp_epsilon_over_floor", "value": epsilon["ratio"],
                     "p25": epsilon["p25"], "p75": epsilon["p75"], "target": "reported", "status": "info",
                     "numerator_median_ms": times["lrp_epsilon"]["median"],
                     "denominator_median_ms": times["floor"]["median"]})
    return rows
