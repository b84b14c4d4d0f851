"""Every gradient CAM in one request against Grad-CAM alone (issue 13).

``predict_and_explain`` with grad_cam, grad_cam_plus_plus, xgrad_cam, hires_cam, layer_cam and
normgrad against ``predict_and_explain`` with grad_cam only, on the same inputs, interleaved
rounds, the median of per-round ratios. The six share the forward pass and the one backward to
the layer, so the goal is at most 1.1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from explainers import predict_and_explain

from .timing import interleaved, ratio, summary_ms

GRADIENT_CAMS = ["grad_cam", "grad_cam_plus_plus", "xgrad_cam", "hires_cam", "layer_cam", "normgrad"]
GOAL = 1.1
GOAL_NAME = "all_gradient_cams_over_grad_cam"


def run(name: str, model: nn.Module, size: int, batches: Sequence[int], rounds: int, budget_s: float,
        device: torch.device, log=print) -> dict:
    """``{"model", "batches": {batch: {"ratios": {GOAL_NAME: ...}}}}`` (run.py's goal-row layout)."""
    section: dict = {"model": name, "methods": GRADIENT_CAMS, "batches": {}}
    for batch in batches:
        inputs = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(device)
        cases = {"grad_cam": lambda: predict_and_explain(model, inputs, ["grad_cam"]),
                 "all": lambda: predict_and_explain(model, inputs, GRADIENT_CAMS)}
        try:
            times = interleaved(cases, rounds, warmup=1, budget_s=budget_s)
        except Exception as error:  # reported, not raised: the rest of the benchmark still counts
            section["batches"][str(batch)] = {"ratios": {GOAL_NAME: {"goal": f"<= {GOAL}",
                                                                     "status": f"failed: {type(error).__name__}: {error}"}}}
            continue
        wall, cpu = ratio(times, "all", "grad_cam"), ratio(times.cpu, "all", "grad_cam")
        value = {"ratio": round(wall["median"], 3), "p25": round(wall["p25"], 3), "p75": round(wall["p75"], 3),
                 "cpu_time_ratio": round(cpu["median"], 3), "goal": f"<= {GOAL}",
                 "status": "ok" if wall["median"] <= GOAL else "short",
                 "numerator_ms": summary_ms(times["all"]), "denominator_ms": summary_ms(times["grad_cam"])}
        section["batches"][str(batch)] = {"ratios": {GOAL_NAME: value}}
        log(f"{name} b={batch}: all gradient CAMs / grad_cam = {value['ratio']} "
            f"[{value['p25']}, {value['p75']}] over {wall['n']} rounds")
    return section


def goal_rows(section: dict) -> list[dict]:
    rows = []
    for batch, entry in section.get("batches", {}).items():
        value = entry["ratios"][GOAL_NAME]
        rows.append({"model": section["model"], "batch": int(batch), "goal": GOAL_NAME, "value": value.get("ratio"),
                     "p25": value.get("p25"), "p75": value.get("p75"), "cpu_time_ratio": value.get("cpu_time_ratio"),
                     "target": value["goal"], "status": value["status"],
                     "numerator_median_ms": value.get("numerator_ms", {}).get("median"),
                     "denominator_median_ms": value.get("denominator_ms", {}).get("median")})
    return rows
