"""In-process measurements: ours against the plain-gradient floor, the stock Captum pattern, Captum IG,
and the handler's predict path against a plain forward; plus what lowers the floor itself."""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

import explainers
from explainers.methods.feature_maps import default_layer
from serving.metrics import prometheus_metrics
from explainers.kernels.rule_models import rule_model_for
from serving.requests import RawRequest
from serving.service import ExplanationService
from serving.settings import ServingSettings
from explainers.validation import model_device

from . import stock
from .timing import interleaved, peak_allocated_bytes, ratio, summary_ms

COMBO = ["saliency", "guided_backprop", "deconvnet", "grad_cam"]


@dataclass(frozen=True)
class Plan:
    rounds: int
    pair_rounds: int
    budget_s: float
    ig_rounds: int
    ig_steps: int
    ig_memory: bool
    floor_rounds: int


def _inputs(batch: int, size: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(device)


def _png(size: int, seed: int = 0) -> bytes:
    pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy(), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def explained_cases(model: nn.Module, inputs: torch.Tensor) -> dict:
    """Callables of every case the ratio goals compare, on one model and batch."""
    with torch.enable_grad():
        layer_name = default_layer(model.eval(), inputs)  # the layer our Grad-CAM weighs by default
    layer = model.get_submodule(layer_name)

    def floor():
        x = inputs.detach().clone().requires_grad_(True)
        logits = model(x)
        torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), x)

    def predict():
        with torch.inference_mode():
            model(inputs)

    def ours(methods):
        return lambda: explainers.predict_and_explain(model, inputs, methods)

    def theirs(methods):
        return lambda: stock.stock_explain(model, layer, inputs, methods)

    return {
        "predict": predict,
        "floor": floor,
        "ours_guided_backprop": ours(["guided_backprop"]),
        "stock_guided_backprop": theirs(["guided_backprop"]),
        "ours_combo": ours(COMBO),
        "stock_combo": theirs(COMBO),
        "ours_guided_grad_cam": ours(["guided_grad_cam"]),
        "stock_guided_grad_cam": theirs(["guided_grad_cam"]),
    }


def handler_cases(model: nn.Module, inputs: torch.Tensor, size: int, num_classes: int) -> dict:
    """The service's predict path (one batched inference_mode forward, metrics, top-k replies)
    against a plain inference_mode forward of the same batch."""
    settings = ServingSettings.from_mapping({"input_size": [size, size], "class_names": [f"class{i}" for i in range(num_classes)],
                                             "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    service = ExplanationService(model, settings, prometheus_metrics())
    prepared = [service._prepare(RawRequest(fields={"body": _png(size, seed)})) for seed in range(inputs.shape[0])]
    batch = torch.cat([item.model_input for item in prepared]).to(model_device(model))

    def handler_predict():
        replies = service._predict(prepared)
        service.metrics.requests(replies)
        assert all(reply.status == 200 for reply in replies)

    def plain_forward():
        with torch.inference_mode():
            model(batch)

    return {"handler_predict": handler_predict, "plain_forward": plain_forward}


def floor_variants(model: nn.Module, inputs: torch.Tensor) -> dict:
    """What lowers the floor itself; reported beside it, never in its place."""
    channels_last_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    rule_model = rule_model_for(model, inputs)
    default_threads = torch.get_num_threads()

    def gradient(forward, x):
        x = x.detach().clone().requires_grad_(True) if not x.requires_grad else x
        logits = forward(x)
        torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), x)

    def one_thread():
        torch.set_num_threads(1)
        try:
            gradient(model, inputs)
        finally:
            torch.set_num_threads(default_threads)

    cases = {
        "floor": lambda: gradient(model, inputs),
        "floor_channels_last_input": lambda: gradient(model, inputs.contiguous(memory_format=torch.channels_last)),
        "floor_channels_last_model_copy": lambda: gradient(channels_last_model, inputs.contiguous(memory_format=torch.channels_last)),
        "floor_rule_graph": lambda: gradient(rule_model, inputs),
    }
    if default_threads > 1:
        cases["floor_1_thread"] = one_thread
    return cases


def _table_entry(times, numerator, denominator, goal, kind):
    stats = ratio(times, numerator, denominator)
    cpu = ratio(times.cpu, numerator, denominator)
    met = stats["median"] <= goal if kind == "max" else stats["median"] >= goal
    return {"ratio": round(stats["median"], 3), "p25": round(stats["p25"], 3), "p75": round(stats["p75"], 3),
            "goal": f"{'<=' if kind == 'max' else '>='} {goal}", "status": "ok" if met else "short",
            "cpu_time_ratio": round(cpu["median"], 3), "rounds": len(times[numerator]),
            "numerator": numerator, "denominator": denominator,
            "numerator_ms": summary_ms(times[numerator]), "denominator_ms": summary_ms(times[denominator])}


def run_model(name: str, model: nn.Module, size: int, num_classes: int, batches: list[int], plan: Plan,
              ig_internal_batch: int, log=print) -> dict:
    device = model_device(model)
    results = {"input_size": [size, size], "batches": {}}
    for batch in batches:
        inputs = _inputs(batch, size, device)
        entry: dict = {}
        cases = explained_cases(model, inputs)
        # Each pair a goal compares runs in its own group, back to back, so no heavy neighbour (a
        # Captum call churning memory) sits systematically before one side of it.
        log(f"[{name} b{batch}] ours vs floor ({plan.pair_rounds} rounds)")
        floor_pair = interleaved({"floor": cases["floor"], "ours_guided_backprop": cases["ours_guided_backprop"]},
                                 plan.pair_rounds, warmup=1, budget_s=plan.budget_s / 2)
        log(f"[{name} b{batch}] handler predict path vs plain forward ({plan.pair_rounds} rounds)")
        handler_pair = interleaved(handler_cases(model, inputs, size, num_classes), plan.pair_rounds, warmup=1,
                                   budget_s=plan.budget_s / 4)
        log(f"[{name} b{batch}] stock vs ours ({plan.rounds} rounds)")
        stock_group = interleaved({key: cases[key] for key in cases if key != "floor"}, plan.rounds, warmup=1,
                                  budget_s=plan.budget_s)
        entry["ratios"] = {
            "ours_gbp_over_floor": _table_entry(floor_pair, "ours_guided_backprop", "floor", 1.10, "max"),
            "stock_gbp_over_ours_gbp": _table_entry(stock_group, "stock_guided_backprop", "ours_guided_backprop", 1.35, "min"),
            "stock_over_ours_saliency_gbp_deconvnet_grad_cam": _table_entry(stock_group, "stock_combo", "ours_combo", 1.6, "min"),
            "stock_over_ours_guided_grad_cam": _table_entry(stock_group, "stock_guided_grad_cam", "ours_guided_grad_cam", 1.7, "min"),
            "handler_predict_over_plain_forward": _table_entry(handler_pair, "handler_predict", "plain_forward", 1.05, "max"),
        }
        entry["times_ms"] = {f"{group_name}/{case}": summary_ms(values)
                             for group_name, group in (("floor_pair", floor_pair), ("handler_pair", handler_pair),
                                                       ("stock_group", stock_group))
                             for case, values in group.items()}

        log(f"[{name} b{batch}] integrated gradients, {plan.ig_steps} steps ({plan.ig_rounds} rounds)")
        entry["integrated_gradients"] = integrated_gradients(model, inputs, plan, ig_internal_batch)

        if plan.floor_rounds:
            log(f"[{name} b{batch}] floor variants ({plan.floor_rounds} rounds)")
            floor_times = interleaved(floor_variants(model, inputs), plan.floor_rounds, warmup=1, budget_s=plan.budget_s)
            entry["floor_variants"] = {
                case: {**summary_ms(values), "over_floor": round(ratio(floor_times, case, "floor")["median"], 3)}
                for case, values in floor_times.items()}
        results["batches"][str(batch)] = entry
    return results


def integrated_gradients(model: nn.Module, inputs: torch.Tensor, plan: Plan, internal_batch: int) -> dict:
    with torch.no_grad():
        targets = model(inputs).argmax(1)
    def ours(n_steps=plan.ig_steps):
        explainers.predict_and_explain(model, inputs, ["integrated_gradients"], target=targets,
                                       integrated_gradients={"n_steps": n_steps, "internal_batch_size": internal_batch})

    def captum(n_steps=plan.ig_steps):
        stock.captum_integrated_gradients(model, inputs, targets, n_steps, internal_batch)

    # Warm-up on one forward's worth of steps: the same shapes, so one-time costs (oneDNN
    # primitives, our affine split) are paid outside the timed calls, at a fraction of a full call.
    one_chunk = max(1, min(plan.ig_steps, internal_batch // inputs.shape[0]))
    ours(one_chunk)
    captum(one_chunk)
    times = interleaved({"ours": ours, "captum": captum}, plan.ig_rounds, warmup=0)
    speedup = ratio(times, "captum", "ours")
    result = {"n_steps": plan.ig_steps, "internal_batch_size": internal_batch,
              "ours_ms": summary_ms(times["ours"]), "captum_ms": summary_ms(times["captum"]),
              "speedup": {"ratio": round(speedup["median"], 3), "p25": round(speedup["p25"], 3), "p75": round(speedup["p75"], 3),
                          "cpu_time_ratio": round(ratio(times.cpu, "captum", "ours")["median"], 3),
                          "goal": ">= 1.2", "status": "ok" if speedup["median"] >= 1.2 else "short"},
              "note": "ours includes its prediction (predict_and_explain); Captum's IG alone"}
    if plan.ig_memory:
        ours_peak, captum_peak = peak_allocated_bytes(ours), peak_allocated_bytes(captum)
        result["peak_memory_mib"] = {"ours": round(ours_peak / 2**20, 1), "captum": round(captum_peak / 2**20, 1),
                                     "goal": "ours <= captum", "status": "ok" if ours_peak <= captum_peak else "short"}
    return result
