"""Real architectures (torchvision, random seeded weights) against the plain-gradient floor.

For each model and batch, three cases run interleaved, round by round (see timing.interleaved):

- ``floor``: one forward and one input-gradient backward with plain autograd on the model itself,
  ``torch.autograd.grad(model(x).gather(1, top1).sum(), x)``: what any gradient map costs at least;
- ``guided_backprop``: ``predict_and_explain(model, x, ["guided_backprop"])``, its prediction included;
- ``saliency_gbp_grad_cam``: ``predict_and_explain(model, x, ["saliency", "guided_backprop", "grad_cam"])``.

Goals are medians of per-round ratios to the floor. Before the rounds, each model's first
``predict_and_explain`` call on a fresh instance (which builds the rule model: trace, check of the
trace against the model, or the fallback) is timed; its excess over a warm call is the model-load
warm-up a server pays once per model (reported, no goal).

A model whose explanation fails (an unsupported activation, a rule applied nowhere) is reported as
``failed: <reason>`` for the goals that need it; the other models still run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

import explainers

from .timing import interleaved, quantiles, ratio, summary_ms

# The list, in order of their floor cost on a CPU (cheap first: a failure shows early).
ARCHITECTURES = ("mobilenet_v3_large", "efficientnet_b0", "resnet50", "densenet121", "convnext_tiny", "swin_t",
                 "vit_b_16")
# --quick: a ReLU network, an SiLU network with squeeze-excitation gates, and a vision transformer
# (GELU, attention softmax, Grad-CAM on a token grid): one of each kind of rule site.
QUICK_ARCHITECTURES = ("resnet50", "efficientnet_b0", "vit_b_16")

COMBO = ("saliency", "guided_backprop", "grad_cam")
GOALS = {"guided_backprop_over_floor": ("guided_backprop", 1.05),
         "saliency_gbp_grad_cam_over_floor": ("saliency_gbp_grad_cam", 1.6)}


@dataclass(frozen=True)
class ArchitecturePlan:
    models: tuple[str, ...]
    batches: tuple[int, ...]
    size: int
    rounds: int
    budget_s: float  # per model and batch: rounds stop early (after 3) once it is spent


def plan_for(mode: str, models: Sequence[str] | None = None) -> ArchitecturePlan:
    if mode == "smoke":  # pytest: layout only, a cheap torchvision model at a small size
        return ArchitecturePlan(tuple(models or ("resnet18",)), (1,), 64, rounds=2, budget_s=2)
    if mode == "quick":
        return ArchitecturePlan(tuple(models or QUICK_ARCHITECTURES), (1,), 224, rounds=3, budget_s=20)
    return ArchitecturePlan(tuple(models or ARCHITECTURES), (1, 4), 224, rounds=7, budget_s=90)


def build_torchvision(name: str, size: int = 224, seed: int = 0) -> nn.Module:
    """``name`` from torchvision with random weights drawn from ``seed``, batch norms calibrated on
    noise (see tools.quality_sources.calibrate_batch_norms)."""
    import torchvision

    from tools.quality_sources import calibrate_batch_norms

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(name, weights=None)
        calibrate_batch_norms(model, torch.randn(2, 3, size, size))
    return model.eval()


def run(plan: ArchitecturePlan, device: torch.device, log=print,
        build: Callable[[str, int], nn.Module] = build_torchvision) -> dict:
    result = {"input_size": [plan.size, plan.size], "batches": list(plan.batches), "rounds": plan.rounds,
              "weights": "random (torchvision weights=None, seeded), batch norms calibrated on noise",
              "models": {}}
    for name in plan.models:
        log(f"[{name}] building")
        try:
            model = build(name, plan.size).to(device)
        except Exception as error:  # an architecture this torchvision lacks, a build that fails
            result["models"][name] = {"failed": _reason(error)}
            continue
        result["models"][name] = run_model(name, model, plan, device, log)
        del model
    return result


def run_model(name: str, model: nn.Module, plan: ArchitecturePlan, device: torch.device, log) -> dict:
    entry: dict = {"parameters": sum(parameter.numel() for parameter in model.parameters()), "batches": {}}
    cold_ms = None
    for index, batch in enumerate(plan.batches):
        inputs = torch.randn(batch, 3, plan.size, plan.size, generator=torch.Generator().manual_seed(batch)).to(device)
        cases = _cases(model, inputs)
        failures: dict[str, str] = {}
        if index == 0:
            # The model's first explained call, before anything else runs on it.
            began = time.perf_counter()
            failures.update(_check("saliency_gbp_grad_cam", cases["saliency_gbp_grad_cam"]))
            _synchronize()
            cold_ms = (time.perf_counter() - began) * 1e3
            entry["path"] = _rule_path(model)
        else:  # every batch size gets its own check: a layer choice can depend on it
            failures.update(_check("saliency_gbp_grad_cam", cases["saliency_gbp_grad_cam"]))
        failures.update(_check("guided_backprop", cases["guided_backprop"]))
        if "guided_backprop" in failures:  # the combination runs guided backprop too
            failures.setdefault("saliency_gbp_grad_cam", failures["guided_backprop"])
        measured = {case: fn for case, fn in cases.items() if case not in failures}
        log(f"[{name} b{batch}] {', '.join(measured)} ({plan.rounds} rounds)"
            + (f"; failed: {', '.join(failures)}" if failures else ""))
        try:
            times = interleaved(measured, plan.rounds, warmup=1, budget_s=plan.budget_s)
        except Exception as error:  # a case that passed its check and failed in a round
            entry["batches"][str(batch)] = {"failed": {"rounds": _reason(error)}, "ratios": {
                goal: {"status": f"failed: {_reason(error)}", "goal": f"<= {target}"} for goal, (_, target) in GOALS.items()}}
            continue
        batch_entry: dict = {"times_ms": {case: summary_ms(values) for case, values in times.items()}, "ratios": {}}
        for goal, (case, target) in GOALS.items():
            if case in failures:
                batch_entry["ratios"][goal] = {"status": f"failed: {failures[case]}", "goal": f"<= {target}"}
                continue
            batch_entry["ratios"][goal] = _ratio_entry(times, case, target)
        if failures:
            batch_entry["failed"] = failures
        entry["batches"][str(batch)] = batch_entry
        if index == 0:
            if "saliency_gbp_grad_cam" in failures:
                entry["load_warmup_ms"] = {"status": f"failed: {failures['saliency_gbp_grad_cam']}"}
            else:
                warm_ms = quantiles(times["saliency_gbp_grad_cam"])["median"] * 1e3
                entry["load_warmup_ms"] = {"first_call_ms": round(cold_ms, 1), "warm_call_ms": round(warm_ms, 1),
                                           "warmup_ms": round(cold_ms - warm_ms, 1), "batch": batch}
    return entry


def _cases(model: nn.Module, inputs: torch.Tensor) -> dict[str, Callable[[], object]]:
    def floor():
        x = inputs.detach().clone().requires_grad_(True)
        logits = model(x)
        return torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), x)

    def ours(methods):
        return lambda: explainers.predict_and_explain(model, inputs, list(methods))

    return {"floor": floor, "guided_backprop": ours(["guided_backprop"]), "saliency_gbp_grad_cam": ours(COMBO)}


def _check(case: str, fn: Callable[[], object]) -> dict[str, str]:
    """``{case: reason}`` when the call fails or guided backprop applied its rule nowhere, else ``{}``."""
    try:
        _, explanations = fn()
    except Exception as error:  # the harness reports any failure per model instead of stopping
        return {case: _reason(error)}
    sites = getattr(explanations.get("guided_backprop"), "rule_sites", None)
    if sites is not None and not sum(sites.values()):
        return {case: "guided_backprop applied its rule at no activation: it returned the plain gradient"}
    return {}


def _ratio_entry(times, case: str, target: float) -> dict:
    stats = ratio(times, case, "floor")
    return {"ratio": round(stats["median"], 3), "p25": round(stats["p25"], 3), "p75": round(stats["p75"], 3),
            "cpu_time_ratio": round(ratio(times.cpu, case, "floor")["median"], 3), "goal": f"<= {target}",
            "status": "ok" if stats["median"] <= target else "short", "rounds": len(times[case]),
            "numerator_ms": summary_ms(times[case]), "denominator_ms": summary_ms(times["floor"])}


def _rule_path(model: nn.Module) -> str | None:
    try:
        from explainers.kernels.rule_models import uses_traced_rules
    except ImportError:
        return None
    return "traced" if uses_traced_rules(model) else "fallback"


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def goal_rows(section: dict) -> list[dict]:
    """Rows of run.py's goal table: two goals per model and batch, and the warm-up per model."""
    rows = []
    for name, entry in section["models"].items():
        if "failed" in entry:
            rows.append({"model": name, "batch": None, "goal": "build", "value": None, "p25": None, "p75": None,
                         "target": "", "status": f"failed: {entry['failed']}", "numerator_median_ms": None,
                         "denominator_median_ms": None})
            continue
        for batch, batch_entry in entry["batches"].items():
            for goal, value in batch_entry["ratios"].items():
                rows.append({"model": name, "batch": int(batch), "goal": goal, "value": value.get("ratio"),
                             "p25": value.get("p25"), "p75": value.get("p75"), "cpu_time_ratio": value.get("cpu_time_ratio"),
                             "target": value["goal"], "status": value["status"],
                             "numerator_median_ms": value.get("numerator_ms", {}).get("median"),
                             "denominator_median_ms": value.get("denominator_ms", {}).get("median")})
        warmup = entry.get("load_warmup_ms", {})
        rows.append({"model": name, "batch": warmup.get("batch"), "goal": "model_load_warmup_ms",
                     "value": warmup.get("warmup_ms"), "p25": None, "p75": None, "target": "reported",
                     "status": warmup.get("status", "info"), "numerator_median_ms": warmup.get("first_call_ms"),
                     "denominator_median_ms": warmup.get("warm_call_ms")})
    return rows
