"""Trains a demo network on freshly generated shapes, on the CPU, in about a minute.

    python -m demo.train --out model_store/build [--architecture allconv|maxpool] [--seed 0] [--epochs 8]

Two architectures, trained the same way: ``allconv`` (AllConvNet, strided convolutions, the served
demo) and ``maxpool`` (MaxPoolNet, VGG-style with max pooling). Writes ``<architecture>_state.pt``
(state dict), index_to_name.json (TorchServe's label map) and the training summary
(training_summary.json for allconv, ``<architecture>_training_summary.json`` otherwise).
"""

from __future__ import annotations

import os

# OpenMP threads spin while they wait for each other by default. On a 2-core machine shared with
# any other busy process, a spinning thread starves its descheduled partner and a training step
# becomes 10-40x slower (measured: 1.7 s instead of 0.16 s per step beside one busy process).
# libgomp reads this once, when torch loads, so it only takes effect if torch is not loaded yet
# (`python -m demo.train`); test runs need it in their environment.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from demo import shapes  # noqa: E402
from demo.allconv import AllConvNet  # noqa: E402
from demo.maxpoolnet import MaxPoolNet  # noqa: E402
from demo.preprocessing import normalize  # noqa: E402

ARCHITECTURES: dict[str, type[torch.nn.Module]] = {"allconv": AllConvNet, "maxpool": MaxPoolNet}
DEFAULT_ARCHITECTURE = "allconv"
INDEX_TO_NAME_FILE = "index_to_name.json"
SUMMARY_FILE = "training_summary.json"


def state_file(architecture: str = DEFAULT_ARCHITECTURE) -> str:
    return f"{architecture}_state.pt"


STATE_FILE = state_file(DEFAULT_ARCHITECTURE)  # the served demo's weights


def summary_file(architecture: str = DEFAULT_ARCHITECTURE) -> str:
    # The served demo keeps its historical name; the other architectures are named after themselves.
    return SUMMARY_FILE if architecture == DEFAULT_ARCHITECTURE else f"{architecture}_{SUMMARY_FILE}"


def build(architecture: str = DEFAULT_ARCHITECTURE, num_classes: int = len(shapes.CLASS_NAMES)) -> torch.nn.Module:
    try:
        return ARCHITECTURES[architecture](num_classes=num_classes)
    except KeyError:
        raise ValueError(f"unknown demo architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}") from None

TRAIN_THREADS = 2
# Held-out data must never overlap the training stream, whatever the training seed.
HELD_OUT_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class TrainingSettings:
    seed: int = 0
    epochs: int = 8
    steps_per_epoch: int = 100
    batch_size: int = 64
    peak_learning_rate: float = 4e-3
    weight_decay: float = 1e-4
    # Fraction of each batch blurred, so soft edges (JPEG, downscaled photos) are in-distribution.
    blur_fraction: float = 0.5
    max_blur_sigma: float = 1.2
    held_out_size: int = 2000
    architecture: str = DEFAULT_ARCHITECTURE


@dataclass(frozen=True)
class TrainingResult:
    model: torch.nn.Module
    held_out_accuracy: float
    seconds: float
    settings: TrainingSettings


def train(settings: TrainingSettings = TrainingSettings()) -> TrainingResult:
    """Trains from scratch; the same settings give the same weights on the same machine."""
    started = time.perf_counter()
    with _training_environment(settings.seed):
        model = build(settings.architecture)
        data_rng = np.random.default_rng(settings.seed)
        blur_generator = torch.Generator().manual_seed(settings.seed)
        total_steps = settings.epochs * settings.steps_per_epoch
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.peak_learning_rate, weight_decay=settings.weight_decay
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=settings.peak_learning_rate, total_steps=total_steps, pct_start=0.2
        )
        model.train()
        for epoch in range(settings.epochs):
            running_loss = 0.0
            for _ in range(settings.steps_per_epoch):
                batch = shapes.generate_torch(settings.batch_size, data_rng)
                images = random_blur(batch.images, settings, blur_generator)
                loss = F.cross_entropy(model(normalize(images)), batch.labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                running_loss += loss.item()
            print(
                f"epoch {epoch + 1}/{settings.epochs}: loss {running_loss / settings.steps_per_epoch:.4f} "
                f"({time.perf_counter() - started:.1f} s)",
                flush=True,
            )
        model.eval()
        accuracy = evaluate(model, settings.held_out_size, settings.seed + HELD_OUT_SEED_OFFSET)
    return TrainingResult(model, accuracy, time.perf_counter() - started, settings)


def random_blur(images: torch.Tensor, settings: TrainingSettings, generator: torch.Generator) -> torch.Tensor:
    """Gaussian-blurs a random subset of the batch, each image with its own sigma."""
    chosen = torch.rand(len(images), generator=generator) < settings.blur_fraction
    if not chosen.any():
        return images
    sigmas = 0.3 + torch.rand(int(chosen.sum()), generator=generator) * (settings.max_blur_sigma - 0.3)
    radius = math.ceil(3 * settings.max_blur_sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets[None, :] / sigmas[:, None]) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)  # [K, taps]
    subset = images[chosen]
    count, channels, height, width = subset.shape
    # One grouped conv per axis blurs every (image, channel) plane with its image's kernel;
    # replicate padding avoids darkening the borders.
    planes = subset.reshape(1, count * channels, height, width)
    per_plane = kernels.repeat_interleave(channels, dim=0)
    planes = F.pad(planes, (radius, radius, 0, 0), mode="replicate")
    planes = F.conv2d(planes, per_plane[:, None, None, :], groups=count * channels)
    planes = F.pad(planes, (0, 0, radius, radius), mode="replicate")
    planes = F.conv2d(planes, per_plane[:, None, :, None], groups=count * channels)
    blurred = images.clone()
    blurred[chosen] = planes.reshape(count, channels, height, width)
    return blurred


@torch.no_grad()
def evaluate(model: torch.nn.Module, count: int, seed: int, batch_size: int = 500) -> float:
    """Top-1 accuracy on `count` freshly generated images."""
    rng = np.random.default_rng(seed)
    correct = 0
    for start in range(0, count, batch_size):
        batch = shapes.generate_torch(min(batch_size, count - start), rng)
        correct += int((model(normalize(batch.images)).argmax(dim=1) == batch.labels).sum())
    return correct / count


def save(result: TrainingResult, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    index_to_name = {str(index): name for index, name in enumerate(shapes.CLASS_NAMES)}
    summary = {
        "held_out_accuracy": result.held_out_accuracy,
        "held_out_seed": result.settings.seed + HELD_OUT_SEED_OFFSET,
        "seconds": round(result.seconds, 2),
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "torch": torch.__version__,
        "settings": asdict(result.settings),
    }
    # The summary and label map go first and the state last: a reader that sees a fresh state
    # file (the cache's signal) then also sees the matching label map.
    architecture = result.settings.architecture
    _write_atomically(out_dir / summary_file(architecture), lambda f: f.write(_json_bytes(summary)))
    _write_atomically(out_dir / INDEX_TO_NAME_FILE, lambda f: f.write(_json_bytes(index_to_name)))
    _write_atomically(out_dir / state_file(architecture), lambda f: torch.save(result.model.state_dict(), f))


def load(out_dir: Path, architecture: str = DEFAULT_ARCHITECTURE) -> torch.nn.Module:
    """The trained model from `out_dir`, in eval mode."""
    with open(out_dir / INDEX_TO_NAME_FILE) as f:
        num_classes = len(json.load(f))
    model = build(architecture, num_classes)
    model.load_state_dict(torch.load(out_dir / state_file(architecture), map_location="cpu", weights_only=True))
    return model.eval()


@contextlib.contextmanager
def _training_environment(seed: int) -> Iterator[None]:
    # Training runs in-process from the tests too, so global torch state is restored afterwards.
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(TRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, indent=2).encode()


def _write_atomically(path: Path, write) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        try:
            write(f)
        except BaseException:
            os.unlink(f.name)
            raise
    # NamedTemporaryFile creates the file owner-only; the artefacts are meant to be shared.
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def main(argv: list[str] | None = None) -> None:
    defaults = TrainingSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the state dict and label map")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default=defaults.architecture)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--steps-per-epoch", type=int, default=defaults.steps_per_epoch)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--held-out-size", type=int, default=defaults.held_out_size)
    args = parser.parse_args(argv)
    settings = TrainingSettings(
        seed=args.seed,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        held_out_size=args.held_out_size,
        architecture=args.architecture,
    )
    result = train(settings)
    save(result, args.out)
    print(
        f"held-out accuracy {result.held_out_accuracy:.4f} on {settings.held_out_size} images; "
        f"trained in {result.seconds:.1f} s; wrote {args.out / state_file(settings.architecture)}"
    )


if __name__ == "__main__":
    main()
