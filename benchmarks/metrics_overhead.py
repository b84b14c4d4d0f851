"""What recording metrics costs on the handler's predict path, as a share of handler time.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/metrics_overhead.py [--iterations 600] [--batch 1 4]

Runs the real handler (handlers/image_explainer.py, the demo model "shapes", its model-config.yaml)
in this process, with TorchServe's real metrics cache loaded from deploy/torchserve/metrics.yaml and
Python logging set up as TorchServe's worker does (``%(message)s`` to stdout), stdout being a pipe
that another process drains, as the Java frontend does. The same predict batch (raw PNGs, no
explanation) is handled in turn, interleaved, with each of these recorders:

  null        NullRecorder: no metrics at all (the baseline);
  null-again  the same once more: an A/A control, showing how much of a difference is noise;
  torchserve  TorchServeRecorder as the handler uses it: observations queued, formatted and
              printed by its writer thread every 50 ms in one logging call;
  sync        TorchServeRecorder(background=False): each line printed at once on the handler's
              thread (one logging call and pipe write per observation, cheap formatting);
  per-line    ts's own API: CachingMetric.add_or_update for every observation (validation,
              Dimension objects, one logging call and one pipe write per line).

Reported per variant: handler time (wall, and process CPU, which includes the writer thread but not
the pipe's reader), as the difference of medians over ``null`` and as the median of per-iteration
paired differences; and "in handler": the time the handler's thread spends inside the recorder
(measured around every recorder call during the real runs, minus the same measurement on ``null``),
as a share of the median handler time without metrics. The goal is under 1 % of handler time.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl  # noqa: E402
from ts.metrics.metric_type_enum import MetricTypes  # noqa: E402

from demo.model_cache import BUILD_DIR, trained_demo_model  # noqa: E402
from demo.shapes import draw_shape  # noqa: E402
from serving import metrics as xm  # noqa: E402
from handlers.image_explainer import ImageExplainerHandler  # noqa: E402

METRICS_YAML = REPO_ROOT / "deploy" / "torchserve" / "metrics.yaml"
MODEL_CONFIG = REPO_ROOT / "model_store" / "shapes" / "model-config.yaml"


class PerLineRecorder(xm.TorchServeRecorder):
    """ts's plain API: ``add_or_update`` (validation, Dimension objects, one log call) per observation."""

    def observe(self, spec, value, **labels):
        self._metrics[spec.name].add_or_update(value, [self._model_name, "Model", *(labels[n] for n in spec.labels)])


class Context:
    """The parts of TorchServe's Context the handler uses."""

    def __init__(self, model_dir: Path):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.manifest = {"model": {"modelFile": "allconv.py", "serializedFile": "allconv_state.pt"}}
        self.model_yaml_config = yaml.safe_load(MODEL_CONFIG.read_text())
        self.model_name = "shapes"
        self.metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
        self.metrics.initialize_cache()

    def get_all_request_header(self, index):
        return {}

    def set_response_status(self, *args):
        pass


def worker_like_logging(sink: str = "pipe") -> subprocess.Popen:
    """Root logging as ts/model_service_worker.py sets it, into a pipe drained by another process
    (sink "pipe", as in TorchServe) or straight into /dev/null (sink "devnull", for comparison)."""
    drain = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    if sink == "devnull":
        stream = open(os.devnull, "w", encoding="utf-8")
    else:
        stream = io.TextIOWrapper(drain.stdin, encoding="utf-8")  # block-buffered, like a piped sys.stdout
    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)
    logging.basicConfig(stream=stream, format="%(message)s", level=logging.INFO)
    return drain


def png(shape: str, size: int = 64) -> bytes:
    image, _ = draw_shape(shape, size=size)
    buffer = io.BytesIO()
    Image.fromarray((np.clip(image.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def model_dir(directory: Path) -> Path:
    trained_demo_model()  # trains only if model_store/build/ is missing or stale
    shutil.copy(REPO_ROOT / "demo" / "allconv.py", directory / "allconv.py")
    for name in ("allconv_state.pt", "index_to_name.json"):
        shutil.copy(BUILD_DIR / name, directory / name)
    return directory


class Timed:
    """Wraps a recorder and adds up the time spent in its calls (on the calling thread)."""

    def __init__(self, inner):
        self.inner, self.spent, self.calls = inner, 0.0, 0

    def observe(self, spec, value, **labels):
        started = time.perf_counter()
        self.inner.observe(spec, value, **labels)
        self.spent += time.perf_counter() - started
        self.calls += 1

    def increment(self, spec, amount=1, **labels):
        started = time.perf_counter()
        self.inner.increment(spec, amount, **labels)
        self.spent += time.perf_counter() - started
        self.calls += 1


def median(values) -> float:
    return statistics.median(values)


def measure(handler, context, variants: dict, batch_size: int, iterations: int, warmup: int) -> dict:
    shapes = ("circle", "square", "triangle", "cross", "star")
    data = [{"body": png(shapes[i % 5])} for i in range(batch_size)]
    names = list(variants)
    wall, cpu, inside = ({name: [] for name in names} for _ in range(3))
    for iteration in range(warmup + iterations):
        order = names[iteration % len(names):] + names[:iteration % len(names)]  # rotate: no position bias
        for name in order:
            metrics = handler.service.metrics = variants[name]
            metrics.recorder.spent, metrics.recorder.calls = 0.0, 0
            started, started_cpu = time.perf_counter(), time.process_time()
            replies = handler.handle(data, context)
            elapsed, elapsed_cpu = time.perf_counter() - started, time.process_time() - started_cpu
            if iteration >= warmup:
                wall[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
                inside[name].append(metrics.recorder.spent)
            assert all("predictions" in reply for reply in replies), replies
    observations = variants["null"].recorder.calls
    base_wall, base_cpu, base_inside = median(wall["null"]), median(cpu["null"]), median(inside["null"])
    rows = {}
    for name in names[1:]:
        rows[name] = {
            "wall_ms": median(wall[name]) * 1e3,
            "wall_pct": (median(wall[name]) - base_wall) / base_wall * 100,
            "wall_paired_pct": median([a - b for a, b in zip(wall[name], wall["null"])]) / base_wall * 100,
            "cpu_pct": (median(cpu[name]) - base_cpu) / base_cpu * 100,
            "cpu_paired_pct": median([a - b for a, b in zip(cpu[name], cpu["null"])]) / base_cpu * 100,
            "inside_us": (median(inside[name]) - base_inside) * 1e6,
            "inside_pct": (median(inside[name]) - base_inside) / base_wall * 100,
        }
    return {"batch": batch_size, "observations": observations, "wall_ms": base_wall * 1e3,
            "cpu_ms": base_cpu * 1e3, "rows": rows}


def report(r: dict) -> None:
    print(f"\nbatch of {r['batch']} predict request(s), {r['observations']} metric observations per batch; "
          f"median handler time without metrics: {r['wall_ms']:.3f} ms wall, {r['cpu_ms']:.3f} ms process CPU")
    print(f"  {'recorder':<11} {'wall ms':>8} {'wall +':>8} {'paired':>8} {'CPU +':>8} {'paired':>8} "
          f"{'in handler':>11} {'share':>7}")
    for name, row in r["rows"].items():
        print(f"  {name:<11} {row['wall_ms']:8.3f} {row['wall_pct']:7.2f}% {row['wall_paired_pct']:7.2f}% "
              f"{row['cpu_pct']:7.2f}% {row['cpu_paired_pct']:7.2f}% {row['inside_us']:8.1f} µs {row['inside_pct']:6.2f}%")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=600, help="timed handle() calls per variant (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (default: 1 4)")
    parser.add_argument("--sink", choices=("pipe", "devnull"), default="pipe",
                        help="the worker's stdout: a pipe read by another process, as in TorchServe (default), or /dev/null")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    drain = worker_like_logging(args.sink)
    work = Path(tempfile.mkdtemp(prefix="metrics-overhead-"))
    handler, variants = ImageExplainerHandler(), {}
    try:
        context = Context(model_dir(work))
        handler.initialize(context)
        recorder_args = (context.metrics, context.model_name, MetricTypes.COUNTER, MetricTypes.HISTOGRAM)
        variants = {
            "null": xm.Metrics(Timed(xm.NullRecorder())),
            "null-again": xm.Metrics(Timed(xm.NullRecorder())),
            "torchserve": xm.Metrics(Timed(xm.TorchServeRecorder(*recorder_args))),
            "sync": xm.Metrics(Timed(xm.TorchServeRecorder(*recorder_args, background=False))),
            "per-line": xm.Metrics(Timed(PerLineRecorder(*recorder_args, background=False))),
        }
        print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; {args.iterations} interleaved predict batches per variant")
        for batch_size in args.batch:
            report(measure(handler, context, variants, batch_size, args.iterations, args.warmup))
        print("\nwall + / CPU +: difference of medians over null; paired: median of per-iteration differences."
              "\nin handler: time on the handler's thread inside recorder calls, over null's; share: of the median"
              "\nwall time without metrics. null-again shows how large a difference noise alone makes.")
    finally:
        # the writer threads flush what is left, then find their queues empty and print nothing more
        for recorder in [getattr(handler.service.metrics, "recorder", None) if handler.service else None,
                         *(metrics.recorder.inner for metrics in variants.values())]:
            if hasattr(recorder, "flush"):
                recorder.flush()
        for root_handler in logging.root.handlers[:]:
            logging.root.removeHandler(root_handler)
        logging.shutdown()
        drain.stdin.close()
        drain.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
