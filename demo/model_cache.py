"""The trained demo models, trained once and cached in model_store/build/ until the demo code changes."""

from __future__ import annotations

import fcntl
from pathlib import Path

from torch import nn

from demo import train as training

DEMO_DIR = Path(__file__).resolve().parent
BUILD_DIR = DEMO_DIR.parent / "model_store" / "build"


def trained_demo_model(build_dir: Path = BUILD_DIR, architecture: str = training.DEFAULT_ARCHITECTURE) -> nn.Module:
    """Loads the cached model, training it first (about a minute) if it is missing or stale.

    Stale means older than any demo/*.py, since any of them can change the data or the model.
    ``architecture``: a key of ``demo.train.ARCHITECTURES`` (the served AllConvNet by default).
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    # Two processes (a test run and `make serve`) may ask at once; only one of them trains.
    with open(build_dir / ".train.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_cache_fresh(build_dir, architecture):
            training.save(training.train(training.TrainingSettings(architecture=architecture)), build_dir)
    return training.load(build_dir, architecture)


def is_cache_fresh(build_dir: Path = BUILD_DIR, architecture: str = training.DEFAULT_ARCHITECTURE) -> bool:
    state = build_dir / training.state_file(architecture)
    if not state.exists() or not (build_dir / training.INDEX_TO_NAME_FILE).exists():
        return False
    newest_source = max(path.stat().st_mtime for path in DEMO_DIR.glob("*.py"))
    return state.stat().st_mtime > newest_source


if __name__ == "__main__":
    # `python -m demo.model_cache`: make sure fresh trained models are in model_store/build/.
    for name in training.ARCHITECTURES:
        trained_demo_model(architecture=name)
        print(BUILD_DIR / training.state_file(name))
