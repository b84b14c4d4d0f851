"""End to end through TorchServe: our handler, the stock Captum pattern and a predict-only handler,
driven by wrk (Debian's ``wrk``, a Lua script for the POST body) at several concurrencies.

All three servers run at once, each on its own free loopback ports with one worker, and the load
runs are interleaved (handler order rotated per repetition), so a slow spell of the machine falls
on all of them alike. Every run is bounded in time; wrk reports throughput, latency percentiles,
bytes and errors from its own counters.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile

from pathlib import Path

import torch
import yaml

from tools.archive import archive_model
from tools.torchserve import TorchServeProcess

from .inprocess import _png

REPO_ROOT = Path(__file__).resolve().parent.parent
HANDLERS = {
    "ours": REPO_ROOT / "handlers" / "image_explainer.py",
    "stock": REPO_ROOT / "benchmarks" / "handlers" / "stock_handler.py",
    "minimal": REPO_ROOT / "benchmarks" / "handlers" / "minimal_handler.py",
}
CONFIG_TEMPLATE = REPO_ROOT / "deploy" / "torchserve" / "local.properties"
EXPLAINERS = ["guided_backprop", "grad_cam"]

WRK_SCRIPT = r"""
local body_file = assert(io.open(os.getenv("XAI_BODY"), "rb"))
wrk.method = "POST"
wrk.body = body_file:read("*all")
body_file:close()
wrk.headers["Content-Type"] = "image/png"

done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    "XAI_RESULT {\"requests\": %d, \"duration_us\": %d, \"bytes\": %d, \"status_errors\": %d, " ..
    "\"socket_errors\": %d, \"p50_us\": %d, \"p99_us\": %d, \"mean_us\": %.1f, \"max_us\": %d}\n",
    summary.requests, summary.duration, summary.bytes, errors.status,
    errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str | None:
    path = wrk_path()
    if path is None:
        return None
    output = subprocess.run([path, "--version"], capture_output=True, text=True).stdout + ""
    return output.splitlines()[0].strip() if output else "wrk"


def _handler_section(handler: str, size: int, class_file: str) -> dict:
    section = {"input_size": [size, size], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "class_names": class_file}
    if handler == "minimal":
        return section
    section.update(top_k=3, default_explainers=list(EXPLAINERS))
    if handler == "ours":
        section.update(render={"encoding": "png"}, caps={"max_explainers_per_request": 4})
    return section


def build_archives(model: torch.nn.Module, model_file: Path, size: int, class_names: list[str], store: Path,
                   batch_size: int, max_batch_delay_ms: int, handlers: list[str]) -> None:
    staging = store / "sources"
    staging.mkdir(parents=True, exist_ok=True)
    state = staging / "weights.pt"
    torch.save(model.state_dict(), state)
    names = staging / "index_to_name.json"
    names.write_text(json.dumps({str(i): name for i, name in enumerate(class_names)}))
    for handler in handlers:
        handler_file = HANDLERS[handler]
        config = {"minWorkers": 1, "maxWorkers": 1, "batchSize": batch_size, "maxBatchDelay": max_batch_delay_ms,
                  "responseTimeout": 300, "handler": _handler_section(handler, size, names.name)}
        config_file = staging / f"{handler}-model-config.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        archive_model(handler, model_file=model_file, serialized_file=state, handler=handler_file,
                      export_path=store, config_file=config_file, extra_files=[names])


def run_wrk(url: str, body_file: Path, connections: int, duration_s: float, headers: dict[str, str]) -> dict:
    command = [wrk_path(), "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--timeout", "60s",
               "-s", str(body_file.with_suffix(".lua")), url]
    for name, value in headers.items():
        command[1:1] = ["-H", f"{name}: {value}"]
    environment = {**os.environ, "XAI_BODY": str(body_file)}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=duration_s + 120)
    for line in completed.stdout.splitlines():
        if line.startswith("XAI_RESULT "):
            result = json.loads(line.removeprefix("XAI_RESULT "))
            seconds = result["duration_us"] / 1e6
            ok = result["requests"] - result["status_errors"]
            return {"requests": result["requests"], "errors": result["status_errors"] + result["socket_errors"],
                    "throughput_rps": round(ok / seconds, 2) if seconds else 0.0,
                    "p50_ms": round(result["p50_us"] / 1e3, 2), "p99_ms": round(result["p99_us"] / 1e3, 2),
                    "bytes_per_response": round(result["bytes"] / max(1, result["requests"]))}
    raise RuntimeError(f"wrk gave no result (exit {completed.returncode}): {completed.stdout}\n{completed.stderr}")


def run(model: torch.nn.Module, model_file: Path, size: int, class_names: list[str], *, concurrencies: list[int],
        duration_s: float, repetitions: int, batch_size: int = 4, max_batch_delay_ms: int = 10,
        handlers: tuple[str, ...] = ("ours", "minimal", "stock"), routes: tuple[str, ...] = ("predict", "explain"),
        log=print) -> dict:
    if wrk_path() is None:
        return {"skipped": "wrk not installed (Debian: apt-get install wrk)"}
    root = Path(tempfile.mkdtemp(prefix="xb"))  # short: TorchServe's worker sockets live under it
    # The workers must import this checkout's explainers/handlers packages.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    servers: dict[str, TorchServeProcess] = {}
    try:
        store = root / "store"
        log("[e2e] archiving the model with each handler")
        build_archives(model, model_file, size, class_names, store, batch_size, max_batch_delay_ms, list(handlers))
        body = root / "image.png"
        body.write_bytes(_png(size, seed=1))
        body.with_suffix(".lua").write_text(WRK_SCRIPT)
        for handler in handlers:
            log(f"[e2e] starting TorchServe with the {handler} handler")
            server = TorchServeProcess(store, [f"{handler}={handler}.mar"], root / handler[:3], config_template=CONFIG_TEMPLATE,
                                       config={"disable_system_metrics": "true"}, startup_timeout=240)
            server.start()
            servers[handler] = server
        samples = _response_samples(servers, body, routes)
        plan = [(route, [h for h in handlers if route == "predict" or h != "minimal"]) for route in routes]
        for route, handlers in plan:  # warm-up: first requests load lazily built state (traces, Captum)
            for handler in handlers:
                run_wrk(_url(servers[handler], handler, route), body, 2, 2, {})
        runs: dict = {}
        for route, handlers in plan:
            for connections in concurrencies:
                for repetition in range(repetitions):
                    shift = repetition % len(handlers)
                    for handler in handlers[shift:] + handlers[:shift]:
                        log(f"[e2e] {route} c={connections} {handler} (rep {repetition + 1}/{repetitions})")
                        result = run_wrk(_url(servers[handler], handler, route), body, connections, duration_s, {})
                        runs.setdefault(route, {}).setdefault(str(connections), {}).setdefault(handler, []).append(result)
        return {"model_input_size": [size, size], "batch_size": batch_size, "max_batch_delay_ms": max_batch_delay_ms,
                "explainers": EXPLAINERS, "duration_s": duration_s, "repetitions": repetitions,
                "load_tool": wrk_version(), "response_body_bytes": samples, "runs": runs,
                "summary": _summarise(runs)}
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _url(server: TorchServeProcess, model: str, route: str) -> str:
    return server.url(f"/{'predictions' if route == 'predict' else 'explanations'}/{model}")


def _response_samples(servers: dict, body: Path, routes) -> dict:
    sizes = {}
    image = body.read_bytes()
    for handler, server in servers.items():
        for route in [r for r in routes if r == "predict" or handler != "minimal"]:
            reply = server.request("POST", _url(server, handler, route)[len(server.inference_url):], image,
                                   {"Content-Type": "image/png"}, timeout=300)
            if reply.status != 200:
                raise RuntimeError(f"{handler} {route}: HTTP {reply.status} {reply.text[:500]}\n{server.log_tail()}")
            sizes[f"{handler}_{route}"] = len(reply.body)
    return sizes


def _summarise(runs: dict) -> dict:
    summary: dict = {}
    for route, by_concurrency in runs.items():
        for connections, by_handler in by_concurrency.items():
            row = {}
            for handler, results in by_handler.items():
                row[handler] = {key: statistics.median(r[key] for r in results)
                                for key in ("throughput_rps", "p50_ms", "p99_ms", "bytes_per_response", "errors")}
            if route == "predict" and "minimal" in by_handler:
                ratios = [o["throughput_rps"] / m["throughput_rps"] for o, m in zip(by_handler["ours"], by_handler["minimal"])
                          if m["throughput_rps"]]
                row["ours_over_minimal_throughput"] = round(statistics.median(ratios), 3) if ratios else None
            elif route == "explain":
                ratios = [o["throughput_rps"] / s["throughput_rps"] for o, s in zip(by_handler["ours"], by_handler["stock"])
                          if s["throughput_rps"]]
                row["ours_over_stock_throughput"] = round(statistics.median(ratios), 3) if ratios else None
            summary.setdefault(route, {})[connections] = row
    predict_ratios = [row["ours_over_minimal_throughput"] for row in summary.get("predict", {}).values()
                      if row.get("ours_over_minimal_throughput") is not None]
    if predict_ratios:
        worst = min(predict_ratios)
        summary["goal_predict_throughput_ours_over_minimal"] = {
            "worst_over_concurrencies": worst, "goal": ">= 0.95", "status": "ok" if worst >= 0.95 else "short"}
    return summary


