"""Soak test: a real TorchServe with the demo model under a few thousand mixed requests.

    python -m tools.soak                      # 3000 requests at concurrency 6
    python -m tools.soak --requests 300 --concurrency 4 --json soak.json

Starts TorchServe with the demo model ``shapes`` (built into ``model_store/`` if needed) on free
loopback ports with the local demo config, warms it up with every kind of request, then sends the
mix: plain predictions (PNG/JPEG, several sizes), explanations with every built-in method (by
header, JSON field and the explanations route, several encodings) and bad requests of a dozen
kinds, each with the status and error code it must get. While it runs it samples the resident
memory (RSS) of the worker processes.

Passes (exit status 0) when every reply is the expected one (no 5xx, no missing reply), no worker
was replaced, and worker RSS after the run is at most ``--max-rss-growth`` (default 10 %) above
the RSS after warm-up. Prints the figures: requests, duration, counts by status and error code,
RSS before/after/peak. The server is stopped on the way out, whatever happens.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from tools.http_client import HttpReply
from tools.torchserve import TorchServeProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_CONFIG = REPO_ROOT / "deploy" / "torchserve" / "local.properties"
MODEL = "shapes"
CLASSES = ("circle", "square", "triangle", "cross", "star")

# Every method at settings a soak can afford; the expensive ones with modest options.
METHODS: dict[str, dict] = {
    "saliency": {},
    "input_x_gradient": {},
    "guided_backprop": {},
    "deconvnet": {},
    "grad_cam": {},
    "guided_grad_cam": {},
    "integrated_gradients": {"n_steps": 16},
    "smoothgrad": {"samples": 8},
    "occlusion": {"window": 16, "stride": 8},
}
ENCODINGS = ("png", "overlay", "npy-f16", "json")


@dataclass(frozen=True)
class Job:
    kind: str  # plain, explain, bad
    path: str
    body: bytes
    headers: dict[str, str]
    status: int = 200
    code: str | None = None  # the error code a bad request must get
    explainers: tuple[str, ...] = ()


@dataclass
class Outcome:
    kind: str
    status: int  # 0: no reply (timeout or connection error)
    code: str | None
    expected: bool
    seconds: float
    detail: str = ""


@dataclass
class SoakResult:
    requests: int = 0
    concurrency: int = 0
    duration_s: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)
    by_status: dict[str, int] = field(default_factory=dict)
    by_code: dict[str, int] = field(default_factory=dict)
    unexpected: int = 0
    server_errors: int = 0  # 5xx
    no_reply: int = 0
    unexpected_examples: list[str] = field(default_factory=list)
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    worker_pids_before: list[int] = field(default_factory=list)
    worker_pids_after: list[int] = field(default_factory=list)
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_growth: float = 0.0
    max_rss_growth: float = 0.10

    @property
    def workers_replaced(self) -> bool:
        return self.worker_pids_before != self.worker_pids_after

    @property
    def passed(self) -> bool:
        return (self.unexpected == 0 and self.server_errors == 0 and self.no_reply == 0
                and not self.workers_replaced and self.rss_growth <= self.max_rss_growth)

    def summary(self) -> str:
        lines = [
            f"soak: {self.requests} requests at concurrency {self.concurrency} in {self.duration_s:.1f} s "
            f"({self.requests / max(self.duration_s, 1e-9):.1f} req/s; latency p50 {self.latency_p50_s * 1000:.0f} ms, "
            f"p99 {self.latency_p99_s * 1000:.0f} ms)",
            f"  by kind:   {dict(sorted(self.by_kind.items()))}",
            f"  by status: {dict(sorted(self.by_status.items()))}",
            f"  by error code: {dict(sorted(self.by_code.items()))}",
            f"  unexpected replies: {self.unexpected} (5xx: {self.server_errors}, no reply: {self.no_reply})",
            f"  worker RSS: {self.rss_before_mb:.1f} MB after warm-up -> {self.rss_after_mb:.1f} MB after the run "
            f"({self.rss_growth * 100:+.1f} %, limit {self.max_rss_growth * 100:.0f} %); peak {self.rss_peak_mb:.1f} MB",
            f"  workers: {self.worker_pids_before} -> {self.worker_pids_after}"
            + ("  (REPLACED during the run)" if self.workers_replaced else ""),
        ]
        lines += [f"  unexpected: {example}" for example in self.unexpected_examples]
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


# -- the request mix ------------------------------------------------------------------------------


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _image_pool(rng: random.Random) -> list[tuple[bytes, str, str]]:
    """(file bytes, content type, shape) of drawn shapes: several sizes, colours and formats."""
    from demo.shapes import draw_shape

    pool = []
    for index in range(24):
        shape = CLASSES[index % len(CLASSES)]
        size = rng.choice((48, 64, 96, 160))
        image, _ = draw_shape(shape, size=size, rotation=rng.uniform(0, 30), seed=index,
                              foreground=tuple(rng.uniform(0.5, 1.0) for _ in range(3)),
                              background=tuple(rng.uniform(0.0, 0.3) for _ in range(3)))
        pixels = (np.clip(image.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
        fmt = "JPEG" if index % 3 == 0 else "PNG"
        pool.append((_encoded(pixels, fmt), f"image/{fmt.lower()}", shape))
    return pool


def _json(document: dict) -> tuple[bytes, dict[str, str]]:
    return json.dumps(document).encode(), {"Content-Type": "application/json"}


def _bad_jobs(image: bytes) -> list[Job]:
    """Bad requests and the (status, code) each must get."""
    b64 = base64.b64encode(image).decode()
    random_bytes = bytes(random.Random(1).getrandbits(8) for _ in range(2048))
    png_type = {"Content-Type": "image/png"}
    path = f"/predictions/{MODEL}"
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, format="PNG")

    def bad(body, headers, status, code):
        return Job("bad", path, body, headers, status, code)

    return [
        bad(b"", png_type, 400, "invalid_request"),
        bad(random_bytes, png_type, 400, "invalid_image"),
        bad(image[: len(image) // 2], png_type, 400, "invalid_image"),
        bad(b'{"image": "abc', {"Content-Type": "application/json"}, 400, "invalid_request"),
        bad(b"some text", {"Content-Type": "text/plain"}, 400, "invalid_request"),
        bad(*_json({"explain": ["saliency"]}), 400, "invalid_request"),
        bad(*_json({"image": "not base64!"}), 400, "invalid_request"),
        bad(*_json({"image": 42}), 400, "invalid_request"),
        bad(bomb.getvalue(), png_type, 413, "payload_too_large"),
        bad(*_json({"image": b64, "explain": ["lime"]}), 400, "unknown_explainer"),
        bad(*_json({"image": b64, "explain": ["saliency", "saliency"]}), 400, "invalid_request"),
        bad(*_json({"image": b64, "explain": ["saliency"], "target": 99}), 400, "invalid_target"),
        bad(*_json({"image": b64, "explain": ["saliency"], "encoding": "gif"}), 400, "invalid_option"),
        bad(*_json({"image": b64, "explain": ["integrated_gradients"],
                    "options": {"integrated_gradients": {"n_steps": 10_000_000}}}), 422, "cost_cap_exceeded"),
        bad(*_json({"image": b64, "explain": ["occlusion"],
                    "options": {"occlusion": {"perturbations_per_eval": 10**9}}}), 422, "cost_cap_exceeded"),
        bad(b"image=abc", {"Content-Type": "application/x-www-form-urlencoded"}, 400, "invalid_request"),
    ]


def _explain_job(rng: random.Random, image: bytes, content_type: str) -> Job:
    methods = tuple(rng.sample(sorted(METHODS), rng.choice((1, 1, 2, 3))))
    options = {name: METHODS[name] for name in methods if METHODS[name]}
    form = rng.choice(("json", "json", "header", "route"))
    if form == "header":
        return Job("explain", f"/predictions/{MODEL}", image, {"Content-Type": content_type, "X-Explain": ",".join(methods)},
                   explainers=methods)
    if form == "route":  # the model's default explainers
        return Job("explain", f"/explanations/{MODEL}", image, {"Content-Type": content_type},
                   explainers=("guided_backprop", "grad_cam"))
    document = {"image": base64.b64encode(image).decode(), "explain": list(methods), "encoding": rng.choice(ENCODINGS)}
    if options:
        document["options"] = options
    if rng.random() < 0.15:
        document["quality"] = True  # a deletion score per explanation
    if rng.random() < 0.3:
        document["target"] = rng.choice(CLASSES)
    elif rng.random() < 0.2:
        document["explain_top_k"] = 2
    return Job("explain", f"/predictions/{MODEL}", *_json(document), explainers=methods)


def request_mix(count: int, seed: int = 0, weights: Sequence[float] = (0.45, 0.35, 0.20)) -> list[Job]:
    """``count`` jobs: plain predictions, explanations and bad requests in the given proportions."""
    rng = random.Random(seed)
    pool = _image_pool(rng)
    bad = _bad_jobs(pool[1][0])
    jobs = []
    for _ in range(count):
        kind = rng.choices(("plain", "explain", "bad"), weights)[0]
        image, content_type, _ = rng.choice(pool)
        if kind == "plain":
            jobs.append(Job("plain", f"/predictions/{MODEL}", image, {"Content-Type": content_type}))
        elif kind == "explain":
            jobs.append(_explain_job(rng, image, content_type))
        else:
            jobs.append(rng.choice(bad))
    return jobs


def warmup_jobs(seed: int = 0) -> list[Job]:
    """Every method, encoding and bad request once or more, so caches and allocator pools fill."""
    rng = random.Random(seed + 1)
    pool = _image_pool(rng)
    jobs = [Job("plain", f"/predictions/{MODEL}", image, {"Content-Type": content_type}) for image, content_type, _ in pool]
    for name, options in METHODS.items():
        for encoding in ENCODINGS:
            image = pool[len(jobs) % len(pool)][0]
            document = {"image": base64.b64encode(image).decode(), "explain": [name], "encoding": encoding}
            if options:
                document["options"] = {name: options}
            jobs.append(Job("explain", f"/predictions/{MODEL}", *_json(document), explainers=(name,)))
    jobs += _bad_jobs(pool[0][0])
    # Then a stretch of the real mix: the worker's allocator reaches its working size under it.
    return jobs + request_mix(300, seed + 2)


# -- running it -----------------------------------------------------------------------------------


def check(job: Job, reply: HttpReply) -> tuple[str | None, bool, str]:
    """(error code, whether the reply is the expected one, what was wrong)."""
    try:
        document = reply.json()
    except ValueError:
        return None, False, f"not JSON: {reply.text[:120]!r}"
    code = document.get("error", {}).get("code") if isinstance(document, dict) and "error" in document else None
    if code is None and reply.status >= 400:
        code = str(document.get("type", "unknown")) if isinstance(document, dict) else "unknown"
    if reply.status != job.status or code != job.code:
        return code, False, f"{job.kind} {job.path}: expected {job.status} {job.code}, got {reply.status} {reply.text[:160]!r}"
    if job.kind == "bad":
        return code, True, ""
    if not document.get("predictions"):
        return code, False, f"{job.kind}: no predictions in {reply.text[:160]!r}"
    if job.kind == "explain":
        explanations = document.get("explanations", {})
        if set(explanations) != set(job.explainers) or "explanation_errors" in document:
            return code, False, f"explain {job.explainers}: got {sorted(explanations)} {document.get('explanation_errors')}"
    return code, True, ""


class RssSampler:
    """Samples the summed RSS of the server's worker processes every ``interval`` seconds."""

    def __init__(self, server: TorchServeProcess, interval: float = 0.5):
        self.server, self.interval = server, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        total = 0
        for pid in self.server.worker_pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def send_all(server: TorchServeProcess, jobs: Sequence[Job], concurrency: int, timeout: float,
             progress: Callable[[int], None] | None = None) -> list[Outcome]:
    def one(job: Job) -> Outcome:
        started = time.monotonic()
        try:
            reply = server.request("POST", job.path, job.body, job.headers, timeout=timeout)
        except OSError as error:  # includes timeouts: no reply is a failure too
            return Outcome(job.kind, 0, None, False, time.monotonic() - started, f"no reply: {error!r}")
        code, expected, detail = check(job, reply)
        return Outcome(job.kind, reply.status, code, expected, time.monotonic() - started, detail)

    outcomes = []
    with ThreadPoolExecutor(concurrency) as pool:
        for index, outcome in enumerate(pool.map(one, jobs), 1):
            outcomes.append(outcome)
            if progress and index % 500 == 0:
                progress(index)
    return outcomes


def run_soak(server: TorchServeProcess, requests: int = 3000, concurrency: int = 6, seed: int = 0,
             max_rss_growth: float = 0.10, timeout: float = 120.0, log: Callable[[str], None] = print) -> SoakResult:
    """Warm up, then send ``requests`` mixed requests to a running server and measure."""
    sampler = RssSampler(server)
    warmup = warmup_jobs(seed)
    log(f"warming up ({len(warmup)} requests) ...")
    warm = send_all(server, warmup, concurrency, timeout)
    result = SoakResult(requests=requests, concurrency=concurrency, max_rss_growth=max_rss_growth)
    result.worker_pids_before = server.worker_pids()
    before = sampler.rss()
    jobs = request_mix(requests, seed)
    log(f"soaking with {requests} requests at concurrency {concurrency} ...")
    started = time.monotonic()
    with sampler:
        outcomes = send_all(server, jobs, concurrency, timeout, lambda done: log(f"  {done}/{requests} sent"))
    result.duration_s = time.monotonic() - started
    after = sampler.rss()
    result.worker_pids_after = server.worker_pids()
    result.rss_before_mb, result.rss_after_mb = before / 2**20, after / 2**20
    result.rss_peak_mb = sampler.peak / 2**20
    result.rss_growth = (after - before) / before if before else float("inf")
    result.by_kind = dict(Counter(outcome.kind for outcome in outcomes))
    result.by_status = {str(status): count for status, count in Counter(outcome.status for outcome in outcomes).items()}
    result.by_code = dict(Counter(outcome.code for outcome in outcomes if outcome.code))
    bad = [outcome for outcome in outcomes if not outcome.expected]
    result.unexpected = len(bad)
    result.server_errors = sum(outcome.status >= 500 for outcome in outcomes)
    result.no_reply = sum(outcome.status == 0 for outcome in outcomes)
    result.unexpected_examples = [outcome.detail for outcome in bad[:10]]
    result.unexpected_examples += [f"(warm-up) {outcome.detail}" for outcome in warm if not outcome.expected][:5]
    latencies = sorted(outcome.seconds for outcome in outcomes)
    result.latency_p50_s = latencies[len(latencies) // 2]
    result.latency_p99_s = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return result


def start_server(model_store: Path, run_dir: Path) -> TorchServeProcess:
    return TorchServeProcess(model_store, {MODEL: f"{MODEL}.mar"}, run_dir, config_template=LOCAL_CONFIG)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests after warm-up (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=6, help="clients at once (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rss-growth", type=float, default=0.10,
                        help="allowed worker RSS growth after warm-up, as a fraction (default: %(default)s)")
    parser.add_argument("--model-store", type=Path, default=None,
                        help="a store holding shapes.mar (default: model_store/, built if needed)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be positive")
    store = args.model_store
    if store is None:
        from tools.demo_store import build_demo_store

        store = build_demo_store().parent
    with tempfile.TemporaryDirectory(prefix="soak-", dir="/tmp") as run_dir:
        with start_server(store, Path(run_dir)) as server:
            print(f"TorchServe up at {server.inference_url} (workers {server.worker_pids()})", flush=True)
            result = run_soak(server, args.requests, args.concurrency, args.seed, args.max_rss_growth,
                              log=lambda line: print(line, flush=True))
    print(result.summary(), flush=True)
    if args.json:
        args.json.write_text(json.dumps({**asdict(result), "passed": result.passed}, indent=2))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
