"""What the Open Inference Protocol front server (package oip) costs a predict request.

One TorchServe (token auth on) with two models behind one front server, as `make serve-kserve`
runs them (tools.serve_kserve.KServeStack): the demo model and ResNet-50 (torchvision, seeded
random weights), both with batchSize 1 so that no request waits for a batch to fill (a lone
request would otherwise wait maxBatchDelay, which hides any cost). One client, keep-alive
connections, the same image each time, three ways interleaved in rotating order:

- direct: POST /predictions/{m} to TorchServe, the raw PNG;
- oip-binary: POST /v2/models/{m}/infer to the front server, the PNG in the binary tensor
  extension, binary outputs (what tritonclient and KServe's SDK send with binary_data);
- oip-json: the same with the PNG as base64 text and JSON outputs.

The front's share of a request is the median of the per-round differences (front - direct, the
two sent back to back) over the front's median latency; their quartiles give its spread. Goal:
<= 10 % on the demo model, <= 3 % on ResNet-50.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
GOALS = {"demo": 0.10, "resnet50": 0.03}
VARIANTS = ("direct", "oip-binary", "oip-json")


class Connection:
    """One keep-alive HTTP/1.1 connection; returns (status, body, seconds)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, float]:
        started = time.perf_counter()
        self.connection.request("POST", path, body, headers)
        response = self.connection.getresponse()
        payload = response.read()
        return response.status, payload, time.perf_counter() - started

    def close(self) -> None:
        self.connection.close()


def binary_body(image: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(image) + 4}}],
                         "parameters": {"binary_data_output": True}}).encode()
    body = header + len(image).to_bytes(4, "little") + image  # a BYTES element: 4-byte length, then the bytes
    return body, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}


def json_body(image: bytes) -> tuple[bytes, dict[str, str]]:
    document = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}]}
    return json.dumps(document).encode(), {"Content-Type": "application/json"}


def build_store(store: Path, log) -> dict[str, tuple[str, bytes]]:
    """demo1.mar and resnet50.mar (batchSize 1) in ``store``; returns {model: (archive, image)}."""
    from benchmarks.inprocess import _png
    from demo.model_cache import BUILD_DIR
    from tools.archive import archive_model, architecture_generated_files
    from tools.demo_server import build_store as demo_store, shape_png
    from tools.demo_store import CONFIG_FILE, HANDLER_FILE, MODEL_FILE, build_demo_store, sanity_members

    store.mkdir(parents=True, exist_ok=True)
    staging = store / "sources"
    staging.mkdir()
    demo_store(staging)  # trains (cached) the demo model's weights
    config = yaml.safe_load(CONFIG_FILE.read_text())
    config.update(batchSize=1, maxBatchDelay=1)
    (staging / "demo-config.yaml").write_text(yaml.safe_dump(config))
    checks = sanity_members(build_demo_store(), staging / "sanity")
    archive_model("demo", model_file=MODEL_FILE, serialized_file=BUILD_DIR / "allconv_state.pt", handler=HANDLER_FILE,
                  export_path=store, config_file=staging / "demo-config.yaml",
                  extra_files=[BUILD_DIR / "index_to_name.json", checks])
    log("[oip] archiving ResNet-50 (torchvision, seeded random weights)")
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), staging / "resnet50.pt")
    generated = architecture_generated_files("torchvision", "resnet50", [f"class{i}" for i in range(1000)])
    resnet = staging / "resnet50"
    resnet.mkdir()
    extra = []
    for name, content in generated.items():
        (resnet / name).write_bytes(content)
        if name != "model-config.yaml":
            extra.append(resnet / name)
    config = yaml.safe_load((resnet / "model-config.yaml").read_text())
    config.update(batchSize=1, maxBatchDelay=1, minWorkers=1, maxWorkers=1, responseTimeout=300)
    config["handler"]["allowed_explainers"] = ["grad_cam"]  # its checks at load stay cheap
    config["handler"]["default_explainers"] = ["grad_cam"]
    (resnet / "model-config.yaml").write_text(yaml.safe_dump(config))
    archive_model("resnet50", model_file=None, serialized_file=staging / "resnet50.pt", handler=HANDLER_FILE,
                  export_path=store, config_file=resnet / "model-config.yaml", extra_files=extra)
    return {"demo": ("demo.mar", shape_png("star")), "resnet50": ("resnet50.mar", _png(224, seed=1))}


def measure(stack, model: str, image: bytes, rounds: int, warmup: int) -> dict:
    direct, front = Connection(stack.torchserve.inference_url), Connection(stack.front.url)
    auth = stack.torchserve.auth_headers()
    requests = {
        "direct": (direct, f"/predictions/{model}", image, {"Content-Type": "image/png", **auth}),
        "oip-binary": (front, f"/v2/models/{model}/infer", *binary_body(image)),
        "oip-json": (front, f"/v2/models/{model}/infer", *json_body(image)),
    }
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    try:
        for index in range(warmup + rounds):
            order = VARIANTS[index % 3:] + VARIANTS[:index % 3]
            for variant in order:
                connection, path, body, headers = requests[variant]
                status, payload, seconds = connection.post(path, body, headers)
                if status != 200:
                    raise RuntimeError(f"{variant} {model}: HTTP {status} {payload[:300]!r}")
                if index >= warmup:
                    times[variant].append(seconds * 1000)
    finally:
        direct.close()
        front.close()
    result = {"rounds": rounds}
    for variant, values in times.items():
        ordered = sorted(values)
        result[f"{variant}_ms"] = {"median": round(statistics.median(values), 3),
                                   "p25": round(ordered[len(ordered) // 4], 3), "p75": round(ordered[3 * len(ordered) // 4], 3)}
    for variant in ("oip-binary", "oip-json"):
        added = [front_ms - direct_ms for front_ms, direct_ms in zip(times[variant], times["direct"])]
        # Paired: each round's front request minus the direct one beside it, so a slow spell of a
        # shared machine falls on both (the medians of each side alone are far noisier on ResNet-50).
        share = statistics.median(added) / statistics.median(times[variant])
        result[f"{variant}_added_ms"] = {"median": round(statistics.median(added), 3),
                                         "p25": round(sorted(added)[len(added) // 4], 3),
                                         "p75": round(sorted(added)[3 * len(added) // 4], 3)}
        result[f"{variant}_share"] = round(share, 4)
    goal = GOALS[model]
    result["goal"] = f"<= {goal:.0%}"
    result["status"] = "ok" if result["oip-binary_share"] <= goal else "short"
    return result


def run(*, quick: bool = False, log=print) -> dict:
    from tools.demo_server import LOCAL_CONFIG
    from tools.serve_kserve import KServeStack

    root = Path(tempfile.mkdtemp(prefix="xo"))  # short: TorchServe's worker sockets live under it
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    try:
        models = build_store(root / "store", log)
        log("[oip] starting TorchServe (token auth on) and the front server")
        with KServeStack(root / "store", {name: archive for name, (archive, _) in models.items()}, root / "run",
                         config_template=LOCAL_CONFIG, config={"disable_system_metrics": "true"},
                         startup_timeout=300) as stack:
            results = {}
            for name, (_, image) in models.items():
                rounds = (60 if quick else 400) if name == "demo" else (8 if quick else 60)
                log(f"[oip] {name}: {rounds} interleaved rounds")
                results[name] = measure(stack, name, image, rounds, warmup=5 if name == "demo" else 2)
        return {"definitions": __doc__.split("\n\n", 1)[1].strip(), "models": results}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def goal_rows(report: dict) -> list[dict]:
    rows = []
    for name, result in report.get("models", {}).items():
        rows.append({"model": f"{name} (OIP front)", "batch": 1, "goal": "oip_front_share_of_predict_latency",
                     "value": result["oip-binary_share"], "p25": None, "p75": None, "target": result["goal"],
                     "status": result["status"], "numerator_median_ms": result["oip-binary_added_ms"]["median"],
                     "denominator_median_ms": result["oip-binary_ms"]["median"]})
    return rows


def render(report: dict) -> list[str]:
    if "models" not in report:
        return ["", f"oip_front: skipped ({report.get('skipped')})"] if report else []
    lines = ["", "oip_front (predict, one client, keep-alive; median ms [p25, p75]; share = median(front - direct) / median front):"]
    for name, result in report["models"].items():
        cells = [f"{variant} {result[f'{variant}_ms']['median']:.2f} [{result[f'{variant}_ms']['p25']:.2f}, "
                 f"{result[f'{variant}_ms']['p75']:.2f}]" for variant in VARIANTS]
        lines.append(f"  {name:<9} " + ";  ".join(cells))
        lines.append(f"  {'':<9} added by the front: binary {result['oip-binary_added_ms']['median']:.2f} ms "
                     f"({result['oip-binary_share']:.1%}), json {result['oip-json_added_ms']['median']:.2f} ms "
                     f"({result['oip-json_share']:.1%}); goal {result['goal']}: {result['status']}")
    return lines


if __name__ == "__main__":
    import sys

    outcome = run(quick="--quick" in sys.argv, log=lambda message: print(message, file=sys.stderr, flush=True))
    print(json.dumps(outcome, indent=1))
    print("\n".join(render(outcome)))
