"""Renders docs/latency.png: real latency data of the demo under load, as Prometheus records it.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m tools.latency_chart [--seconds 90] [--out docs/latency.png]

Starts what `make serve` starts (TorchServe with deploy/torchserve/local.properties and the demo
model "shapes", built by tools.demo_store if needed) on free loopback ports, and a real
Prometheus scraping it every second (tools/prometheus.py). Then drives a bounded,
mixed load in two phases (one client, then three), with a fixed random seed: plain predictions,
explanations with one of six explainers, the /explanations route and some bad input. Afterwards it
asks Prometheus's range API for the same PromQL the Grafana dashboard uses (request rate by route and
outcome; p50/p95/p99 by stage and by explainer; mean latency by stage from _sum/_count) and draws
them with matplotlib (a docs dependency only: it comes with captum). Both servers are stopped at
the end, also on failure or Ctrl-C. Nothing is left behind but the PNG (and --json, if given).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tools.demo_server import LOCAL_CONFIG, b64, build_store, shape_png
from tools.prometheus import PrometheusServer
from tools.torchserve import TorchServeProcess

REPO_ROOT = Path(__file__).resolve().parents[1]

SHAPES = ("circle", "square", "triangle", "cross", "star")
# (weight, what): the load mix. Explainers differ in cost by two orders of magnitude.
MIX = [
    (50, "predict"),
    (8, "explain:grad_cam"),
    (8, "explain:saliency"),
    (6, "explain:guided_backprop"),
    (4, "explain:integrated_gradients"),
    (3, "explain:smoothgrad"),
    (3, "explain:occlusion"),
    (8, "explanations_route"),  # /explanations: default explainers guided_backprop + grad_cam
    (7, "bad_image"),
    (3, "unknown_explainer"),
]
RATE_WINDOW = "15s"
STEP = 2  # seconds between points of the range queries
QUANTILES = (0.5, 0.95, 0.99)


def send(server: TorchServeProcess, kind: str, rng: random.Random) -> int:
    image = shape_png(rng.choice(SHAPES), size=rng.choice((64, 96, 128)))
    png = {"Content-Type": "image/png"}
    if kind == "predict":
        reply = server.request("POST", "/predictions/shapes", image, png, timeout=120)
    elif kind.startswith("explain:"):
        body = json.dumps({"image": b64(image), "explain": [kind.split(":", 1)[1]]}).encode()
        reply = server.request("POST", "/predictions/shapes", body, {"Content-Type": "application/json"}, timeout=120)
    elif kind == "explanations_route":
        reply = server.request("POST", "/explanations/shapes", image, png, timeout=120)
    elif kind == "bad_image":
        reply = server.request("POST", "/predictions/shapes", b"not an image at all", png, timeout=120)
    elif kind == "unknown_explainer":
        reply = server.request("POST", "/predictions/shapes", image, {**png, "X-Explain": "lime"}, timeout=120)
    else:
        raise ValueError(kind)
    return reply.status


def drive_load(server: TorchServeProcess, phases: list[tuple[int, float]], seed: int, max_requests: int) -> dict:
    """Each phase: (clients, seconds). Every client sends back to back; at most max_requests in all."""
    weights, kinds = zip(*MIX)
    sent: dict[str, int] = {}
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    budget = [max_requests]

    def client(index: int, until: float) -> None:
        rng = random.Random(seed * 1000 + index)
        while time.monotonic() < until:
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            kind = rng.choices(kinds, weights)[0]
            status = send(server, kind, rng)
            with lock:
                sent[kind] = sent.get(kind, 0) + 1
                statuses[status] = statuses.get(status, 0) + 1

    started = []
    for number, (clients, seconds) in enumerate(phases):
        started.append(time.time())
        until = time.monotonic() + seconds
        print(f"load phase {number + 1}: {clients} client(s) for {seconds:.0f} s", flush=True)
        with ThreadPoolExecutor(clients) as pool:
            for future in [pool.submit(client, number * 100 + i, until) for i in range(clients)]:
                future.result()
    return {"sent": sent, "statuses": statuses, "phase_starts": started}


def range_series(prom: PrometheusServer, query: str, start: float, end: float) -> list[dict]:
    return prom.api("query_range", {"query": query, "start": start, "end": end, "step": STEP})["result"]


def collect(prom: PrometheusServer, start: float, end: float) -> dict:
    bucket = f'xai_stage_latency_seconds_bucket{{ModelName="shapes"}}'
    data = {
        "rate": range_series(prom, f'sum by (route, outcome) (rate(xai_requests_total{{ModelName="shapes"}}[{RATE_WINDOW}]))', start, end),
        "mean_by_stage": range_series(
            prom, f'sum by (stage) (rate(xai_stage_latency_seconds_sum{{ModelName="shapes"}}[{RATE_WINDOW}])) '
                  f'/ sum by (stage) (rate(xai_stage_latency_seconds_count{{ModelName="shapes"}}[{RATE_WINDOW}]))', start, end),
    }
    for q in QUANTILES:
        data[f"stage_p{q}"] = range_series(
            prom, f"histogram_quantile({q}, sum by (le, stage) (rate({bucket}[{RATE_WINDOW}])))", start, end)
        data[f"explainer_p{q}"] = range_series(
            prom, f'histogram_quantile({q}, sum by (le, explainer) (rate(xai_stage_latency_seconds_bucket'
                  f'{{ModelName="shapes",stage="explain"}}[{RATE_WINDOW}])))', start, end)
    return data


def points(series: dict, start: float) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for t, v in series["values"]:
        value = float(v)
        if value == value and value not in (float("inf"), float("-inf")):  # NaN where nothing was observed
            xs.append(float(t) - start)
            ys.append(value)
    return xs, ys


def render(data: dict, meta: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    start = meta["start"]
    styles = {0.5: "-", 0.95: "--", 0.99: ":"}
    fig, axes = plt.subplots(2, 2, figsize=(15, 9.5), constrained_layout=True)
    fig.suptitle(f"torchserve-xai demo under load, as scraped by Prometheus ({meta['requests']} requests in "
                 f"{meta['seconds']:.0f} s; phase 2 from t={meta['phase2_at']:.0f} s: 3 clients instead of 1)",
                 fontsize=13)

    ax = axes[0][0]
    colors = {("predict", "ok"): "tab:blue", ("explain", "ok"): "tab:green",
              ("predict", "client_error"): "tab:orange", ("explain", "client_error"): "tab:red",
              ("predict", "server_error"): "tab:purple", ("explain", "server_error"): "black"}
    for series in sorted(data["rate"], key=lambda s: (s["metric"]["route"], s["metric"]["outcome"])):
        key = (series["metric"]["route"], series["metric"]["outcome"])
        xs, ys = points(series, start)
        if any(ys):
            ax.plot(xs, ys, label=f"{key[0]} / {key[1]}", color=colors.get(key))
    ax.set_title(f"xai_requests_total: requests/s by route and outcome (rate over {RATE_WINDOW})")
    ax.set_ylabel("requests / s")
    ax.legend(loc="upper left", fontsize=9)

    stage_colors = {"decode": "tab:blue", "preprocess": "tab:orange", "inference": "tab:green",
                    "explain": "tab:red", "encode": "tab:purple"}
    ax = axes[0][1]
    for series in data["mean_by_stage"]:
        stage = series["metric"]["stage"]
        xs, ys = points(series, start)
        ax.plot(xs, [y * 1e3 for y in ys], label=stage, color=stage_colors.get(stage))
    ax.set_yscale("log")
    ax.set_title("Mean latency by stage (exact: _sum / _count)")
    ax.set_ylabel("ms (log)")
    ax.legend(loc="upper left", fontsize=9)

    first_bucket_ms = 5.0
    for ax, prefix, label_name, palette, title in (
        (axes[1][0], "stage_p", "stage", stage_colors, "p50 / p95 / p99 by stage (histogram_quantile)"),
        (axes[1][1], "explainer_p", "explainer", None, "Explain stage: p50 / p95 / p99 by explainer"),
    ):
        names = sorted({s["metric"][label_name] for q in QUANTILES for s in data[f"{prefix}{q}"]})
        cmap = plt.get_cmap("tab10")
        color_of = palette or {name: cmap(i) for i, name in enumerate(names)}
        for q in QUANTILES:
            for series in data[f"{prefix}{q}"]:
                name = series["metric"][label_name]
                xs, ys = points(series, start)
                ax.plot(xs, [y * 1e3 for y in ys], styles[q], color=color_of.get(name), linewidth=1.4)
        ax.axhspan(0.01, first_bucket_ms, color="0.9", zorder=0)
        ax.text(0.99, 0.02, "below 5 ms = TorchServe's first bucket: quantiles there are interpolated, read '< 5 ms'",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="0.35")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5)
        ax.set_title(title)
        ax.set_ylabel("ms (log)")
        handles = [Line2D([], [], color=color_of[name], label=name) for name in names]
        handles += [Line2D([], [], color="0.3", linestyle=styles[q], label=f"p{int(q * 100)}") for q in QUANTILES]
        ax.legend(handles=handles, loc="upper left", fontsize=8, ncol=2)

    for row in axes:
        for ax in row:
            ax.set_xlabel("seconds since load start")
            ax.axvline(meta["phase2_at"], color="0.5", linewidth=0.8, linestyle="-.")
            ax.grid(True, which="major", alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    from PIL import Image

    with Image.open(out) as image:  # a 128-colour palette: a third of the size, same look
        image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90, help="load duration, split in two phases (default %(default)s)")
    parser.add_argument("--max-requests", type=int, default=5000, help="upper bound on requests sent (default %(default)s)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "latency.png")
    parser.add_argument("--json", type=Path, help="also write the queried series here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="latency-chart-") as work:
        store = build_store(Path(work) / "store")
        with TorchServeProcess(store, {"shapes": "shapes.mar"}, Path(work) / "run", config_template=LOCAL_CONFIG) as server:
            target = server.metrics_url.split("://", 1)[1]
            with PrometheusServer(targets=[target]) as prom:
                prom.wait_for_target_up(timeout=30)
                print(f"TorchServe {server.inference_url} (metrics {server.metrics_url}), Prometheus {prom.url}", flush=True)
                time.sleep(3)  # a few scrapes before the load: rates start from a known zero
                start = time.time()
                phases = [(1, args.seconds / 2), (3, args.seconds / 2)]
                result = drive_load(server, phases, args.seed, args.max_requests)
                time.sleep(2 * STEP + 2)  # the last scrapes
                end = time.time()
                data = collect(prom, start - 2, end)
    meta = {"start": start, "seconds": end - start, "phase2_at": result["phase_starts"][1] - start,
            "requests": sum(result["sent"].values()), **result}
    print(f"sent {meta['requests']} requests: {dict(sorted(result['sent'].items()))}; statuses {result['statuses']}")
    render(data, meta, args.out)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "series": data}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
