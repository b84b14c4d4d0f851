"""python -m benchmarks.run [--quick] [--out benchmarks/results/latest.json]

Measures the performance goals of the explainer layer and the TorchServe handler side by side in
one run, prints a table and writes JSON: every ratio with ok/short against its goal, absolute
medians and spreads beside it, and the machine it ran on. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "latest.json"
SCHEMA_VERSION = 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict:
    import captum

    info = {"cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "captum": captum.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "device": str(device),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "load_average_at_start": list(os.getloadavg())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def plans(mode: str):
    from .inprocess import Plan

    if mode == "smoke":  # the pytest smoke test: layout only, numbers meaningless
        return {"demo": Plan(rounds=2, pair_rounds=2, budget_s=5, ig_rounds=1, ig_steps=4, ig_memory=True, floor_rounds=0),
                "resnet50": None}
    if mode == "quick":
        return {"demo": Plan(rounds=12, pair_rounds=20, budget_s=10, ig_rounds=2, ig_steps=32, ig_memory=True, floor_rounds=0),
                "resnet50": Plan(rounds=2, pair_rounds=4, budget_s=15, ig_rounds=1, ig_steps=4, ig_memory=False, floor_rounds=0)}
    return {"demo": Plan(rounds=30, pair_rounds=60, budget_s=40, ig_rounds=5, ig_steps=32, ig_memory=True, floor_rounds=0),
            "resnet50": Plan(rounds=7, pair_rounds=21, budget_s=100, ig_rounds=2, ig_steps=32, ig_memory=True, floor_rounds=5)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~2-minute smoke version (fewer rounds, short load runs)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: tiny, in-process, demo only
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the TorchServe end-to-end part")
    parser.add_argument("--no-architectures", action="store_true", help="skip the torchvision architectures part")
    parser.add_argument("--no-lrp", action="store_true", help="skip the LRP-against-the-floor part (ResNet-50)")
    parser.add_argument("--architectures-only", action="store_true",
                        help="only the torchvision architectures part (no demo, ResNet-50 shape or end-to-end part)")
    parser.add_argument("--architectures", nargs="+", metavar="NAME",
                        help="torchvision models of the architectures part (default: the issue's seven; --quick: three)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    arguments = parser.parse_args(argv)
    if arguments.architectures_only and arguments.no_architectures:
        parser.error("--architectures-only and --no-architectures exclude each other")

    from . import architectures, cam_family, e2e, inprocess, lrp, oip_front
    from .models import RESNET50_FILE, demo_model, resnet50

    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mode = "smoke" if arguments.smoke else "quick" if arguments.quick else "full"
    started = time.perf_counter()
    log = lambda message: print(f"{time.perf_counter() - started:7.1f}s {message}", file=sys.stderr, flush=True)  # noqa: E731

    report: dict = {"schema_version": SCHEMA_VERSION, "mode": mode, "machine": machine(device), "models": {},
                    "definitions": DEFINITIONS}
    demo, demo_description, demo_file = demo_model()
    selected = plans(mode)
    models = [] if arguments.architectures_only else [("demo", demo.to(device), demo_description, 64, 5, [1, 4], 32 * 4)]
    if selected["resnet50"] is not None and not arguments.architectures_only:
        models.append(("resnet50", resnet50().to(device), "ResNet-50 shape (benchmarks.models.ResNet50, seeded random weights)",
                       224, 1000, [1, 4], 16))
    for name, model, description, size, classes, batches, ig_batch in models:
        result = inprocess.run_model(name, model, size, classes, batches, selected[name], ig_batch, log=log)
        report["models"][name] = {"description": description, **result}
    if models:  # issue 13: every gradient CAM in one request against Grad-CAM alone (ResNet-50; smoke: the demo)
        name, model, _, size, *_ = models[-1]
        rounds, budget_s = CAM_FAMILY_ROUNDS[mode]
        report["cam_family"] = cam_family.run(name, model, size, [1, 4], rounds, budget_s, device, log=log)

    if arguments.no_architectures:
        report["architectures"] = {"skipped": "--no-architectures"}
    else:
        report["architectures"] = architectures.run(architectures.plan_for(mode, arguments.architectures), device, log=log)

    if arguments.no_lrp or arguments.architectures_only:
        report["lrp"] = {"skipped": "--no-lrp" if arguments.no_lrp else "--architectures-only"}
    else:
        report["lrp"] = lrp.run(lrp.plan_for(mode), device, log=log)

    if arguments.no_e2e or arguments.smoke or arguments.architectures_only:
        report["oip_front"] = {"skipped": "--no-e2e" if arguments.no_e2e else "smoke mode" if arguments.smoke
                               else "--architectures-only"}
        report["end_to_end"] = {"skipped": "--no-e2e" if arguments.no_e2e else "smoke mode" if arguments.smoke
                                else "--architectures-only"}
    else:
        quick = mode == "quick"
        report["end_to_end"] = guarded(e2e.run, demo.cpu(), demo_file, 64, [f"class{i}" for i in range(5)],
                                       concurrencies=[1, 8] if quick else [1, 4, 8], duration_s=2 if quick else 6,
                                       repetitions=1 if quick else 2, log=log)
        # The Open Inference Protocol front server's share of a predict request (demo, ResNet-50).
        report["oip_front"] = guarded(oip_front.run, quick=quick, log=log)
        if not quick:  # the predict path where the model's forward dominates, as in most deployments
            report["end_to_end_resnet50_predict"] = guarded(
                e2e.run, resnet50(), RESNET50_FILE, 224, [f"class{i}" for i in range(1000)], concurrencies=[4], duration_s=10,
                repetitions=2, handlers=("ours", "minimal"), routes=("predict",), log=log)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    report["goals"] = goal_table(report)
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(report, indent=1) + "\n")
    print(render(report))
    print(f"\nwritten {arguments.out} in {report['elapsed_s']} s", file=sys.stderr)
    return 0


def guarded(function, *args, **kwargs) -> dict:
    """An end-to-end part that fails is reported as such; the in-process results still count."""
    try:
        return function(*args, **kwargs)
    except Exception as error:  # a server that did not start, wrk missing a result, ...
        return {"skipped": f"failed: {type(error).__name__}: {str(error)[:2000]}"}


# (rounds, budget in seconds) of the CAM family part per mode.
CAM_FAMILY_ROUNDS = {"smoke": (2, 5), "quick": (5, 40), "full": (11, 120)}

DEFINITIONS = {
    "floor": "forward with autograd + torch.autograd.grad of the top-1 logit w.r.t. the input, on the model as given",
    "stock": "no-grad prediction, then Captum attribute() per method (GuidedBackprop, Saliency(abs=False), Deconvolution, "
             "LayerGradCam(relu) + bilinear interpolate, GuidedGradCam(bilinear))",
    "ours": "explainers.predict_and_explain(model, inputs, methods), prediction included",
    "ratios": "median over rounds of the per-round ratio (both sides measured back to back); p25/p75 its quartiles; "
              "ours/floor and handler/plain forward in their own two-case groups; cpu_time_ratio: the same on this "
              "process's CPU time (a cross-check on a shared machine)",
    "integrated_gradients": "ours via predict_and_explain (its prediction included) vs captum IntegratedGradients, "
                            "riemann_middle, same n_steps and internal_batch_size; speedup = captum / ours",
    "architectures": "torchvision models with seeded random weights (batch norms calibrated on noise); floor: "
                     "torch.autograd.grad(model(x).gather(1, top1).sum(), x) on the model itself; guided_backprop and "
                     "saliency_gbp_grad_cam: one predict_and_explain call; ratios to the floor, interleaved rounds; "
                     "model_load_warmup_ms: the first predict_and_explain(saliency, guided_backprop, grad_cam) call on a "
                     "fresh model (builds and checks its rule model) minus the median warm call",
    "lrp": "torchvision resnet50 (seeded random weights, batch norms calibrated on noise); predict_and_explain(model, x, "
           "['lrp']) with the epsilon_plus_flat composite (and, reported, epsilon) against the floor, interleaved rounds, "
           "median of per-round ratios",
    "cam_family": "predict_and_explain with grad_cam, grad_cam_plus_plus, xgrad_cam, hires_cam, layer_cam and normgrad "
                  "over predict_and_explain with grad_cam alone, same inputs, interleaved rounds (goal <= 1.1)",
    "peak_memory": "peak of tensor memory allocated during one call (profiler allocator events on CPU)",
    "oip_front": "predict through the OIP front server (binary tensor extension) vs TorchServe directly, one client, "
                 "keep-alive, same image, interleaved, batchSize 1; share = median of per-round (front - direct) / median front",
}


def goal_table(report: dict) -> list[dict]:
    rows = []
    for model_name, model in report["models"].items():
        for batch, entry in model["batches"].items():
            for goal_name, value in entry["ratios"].items():
                rows.append({"model": model_name, "batch": int(batch), "goal": goal_name, "value": value["ratio"],
                             "p25": value["p25"], "p75": value["p75"], "cpu_time_ratio": value["cpu_time_ratio"], "target": value["goal"], "status": value["status"],
                             "numerator_median_ms": value["numerator_ms"]["median"],
                             "denominator_median_ms": value["denominator_ms"]["median"]})
            ig = entry["integrated_gradients"]
            rows.append({"model": model_name, "batch": int(batch), "goal": f"integrated_gradients_speedup_{ig['n_steps']}_steps",
                         "value": ig["speedup"]["ratio"], "p25": ig["speedup"]["p25"], "p75": ig["speedup"]["p75"],
                         "cpu_time_ratio": ig["speedup"]["cpu_time_ratio"],
                         "target": ig["speedup"]["goal"], "status": ig["speedup"]["status"],
                         "numerator_median_ms": ig["captum_ms"]["median"], "denominator_median_ms": ig["ours_ms"]["median"]})
            if "peak_memory_mib" in ig:
                memory = ig["peak_memory_mib"]
                rows.append({"model": model_name, "batch": int(batch), "goal": "integrated_gradients_peak_memory_mib",
                             "value": memory["ours"], "p25": None, "p75": None, "target": f"<= captum {memory['captum']}",
                             "status": memory["status"], "numerator_median_ms": None, "denominator_median_ms": None})
    if "cam_family" in report:
        from .cam_family import goal_rows as cam_family_rows

        rows += cam_family_rows(report["cam_family"])
    if "models" in report.get("architectures", {}):
        from .architectures import goal_rows

        rows += goal_rows(report["architectures"])
    if "lrp" in report and "skipped" not in report["lrp"]:
        from .lrp import goal_rows as lrp_rows

        rows += lrp_rows(report["lrp"])
    from .oip_front import goal_rows as oip_goal_rows

    rows += oip_goal_rows(report.get("oip_front", {}))
    for key, label in (("end_to_end", "demo (TorchServe)"), ("end_to_end_resnet50_predict", "resnet50 (TorchServe)")):
        goal = report.get(key, {}).get("summary", {}).get("goal_predict_throughput_ours_over_minimal")
        if goal:
            rows.append({"model": label, "batch": None, "goal": "e2e_predict_throughput_ours_over_minimal",
                         "value": goal["worst_over_concurrencies"], "p25": None, "p75": None, "target": goal["goal"],
                         "status": goal["status"], "numerator_median_ms": None, "denominator_median_ms": None})
    return rows


def render(report: dict) -> str:
    m = report["machine"]
    lines = [f"machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, {m['threads']} threads, "
             f"device {m['device']}, load {m['load_average_at_start'][0]:.1f} -> {m['load_average_at_end'][0]:.1f}", ""]
    header = (f"{'model':<22}{'b':>2}  {'goal':<50}{'value':>7}  {'[p25, p75]':<16}{'cpu':>6}  {'target':<18}{'status':<7}"
              f"{'num ms':>9}{'den ms':>9}")
    lines += [header, "-" * len(header)]
    for row in report["goals"]:
        spread = f"[{row['p25']}, {row['p75']}]" if row["p25"] is not None else ""
        fmt = lambda v: f"{v:9.1f}" if isinstance(v, (int, float)) else f"{'':>9}"  # noqa: E731
        cpu = row.get("cpu_time_ratio")
        value = row["value"] if row["value"] is not None else "-"
        lines.append(f"{row['model']:<22}{row['batch'] if row['batch'] is not None else '':>2}  {row['goal']:<50}"
                     f"{value:>7}  {spread:<16}{cpu if cpu is not None else '':>6}  {row['target']:<18}{row['status']:<7}"
                     f"{fmt(row['numerator_median_ms'])}{fmt(row['denominator_median_ms'])}")
    for model_name, model in report["models"].items():
        for batch, entry in model["batches"].items():
            if "floor_variants" in entry:
                lines += ["", f"floor variants, {model_name} batch {batch} (median ms, ratio to floor):"]
                for case, stats in entry["floor_variants"].items():
                    lines.append(f"  {case:<34}{stats['median']:9.1f} ms  [{stats['p25']}, {stats['p75']}]  x{stats['over_floor']}")
    for key in ("end_to_end", "end_to_end_resnet50_predict"):
        lines += render_e2e(report.get(key, {}), key)
    from .oip_front import render as render_oip

    lines += render_oip(report.get("oip_front", {}))
    return "\n".join(lines)


def render_e2e(e2e: dict, key: str) -> list[str]:
    lines = []
    if "summary" in e2e:
        lines += ["", f"{key} (TorchServe, {e2e['load_tool']}, input {e2e['model_input_size']}, batchSize {e2e['batch_size']}, "
                      f"{e2e['duration_s']} s x {e2e['repetitions']} per point; explain = {'+'.join(e2e['explainers'])}):",
                  f"  {'route':<8}{'c':>3}  {'handler':<8}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'bytes':>10}{'errors':>7}"]
        for route, by_concurrency in e2e["summary"].items():
            if not isinstance(by_concurrency, dict) or route.startswith("goal"):
                continue
            for connections, row in by_concurrency.items():
                for handler, stats in row.items():
                    if isinstance(stats, dict):
                        lines.append(f"  {route:<8}{connections:>3}  {handler:<8}{stats['throughput_rps']:8.1f}{stats['p50_ms']:9.1f}"
                                     f"{stats['p99_ms']:9.1f}{stats['bytes_per_response']:10.0f}{stats['errors']:7.0f}")
                ratio_key = next((k for k in row if k.endswith("_throughput")), None)
                if ratio_key:
                    lines.append(f"  {'':<8}{'':>3}  {ratio_key} = {row[ratio_key]}")
        lines.append(f"  response body bytes: {e2e['response_body_bytes']}")
    elif e2e:
        lines += ["", f"{key}: skipped ({e2e.get('skipped')})"]
    return lines


if __name__ == "__main__":
    sys.exit(main())
