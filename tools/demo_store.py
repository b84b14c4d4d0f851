"""Builds model_store/shapes.mar, the demo model, when it is missing or older than its sources.

``python -m tools.demo_store`` trains the demo model first if its cached weights are
missing or stale (about a minute on two cores), then archives it with the explainer handler.
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path

from demo import train as training
from demo.model_cache import BUILD_DIR, trained_demo_model
from tools.archive import archive_model, mar_is_stale

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "shapes"
MODEL_FILE = REPO_ROOT / "demo" / "allconv.py"
CONFIG_FILE = REPO_ROOT / "model_store" / "shapes" / "model-config.yaml"
HANDLER_FILE = REPO_ROOT / "handlers" / "image_explainer.py"
# The probes of the archived sanity checks: shapes drawn afresh (disjoint from the training stream,
# seed 0, and the quality report's images), two of each class.
SAMPLE_SEED = 9_000_017
SAMPLES_PER_CLASS = 2
SANITY_SOURCES = (REPO_ROOT / "serving" / "sanity.py", REPO_ROOT / "explainers" / "evaluation" / "sanity.py")


def build_demo_store(export_path: Path = REPO_ROOT / "model_store", build_dir: Path = BUILD_DIR,
                     force: bool = False) -> Path:
    """The path of ``shapes.mar`` in ``export_path``, (re)built if needed."""
    trained_demo_model(build_dir)
    state, names = build_dir / training.STATE_FILE, build_dir / training.INDEX_TO_NAME_FILE
    mar = Path(export_path) / f"{MODEL_NAME}.mar"
    # Only the handler file is copied into the archive; it imports the installed plugin at run time.
    # The sanity checks stored in the archive are rebuilt with the code that measures them.
    sources = [MODEL_FILE, CONFIG_FILE, HANDLER_FILE, state, names, *SANITY_SOURCES]
    if force or mar_is_stale(mar, sources):
        with tempfile.TemporaryDirectory(prefix="demo-samples-") as samples:
            archive_model(MODEL_NAME, model_file=MODEL_FILE, serialized_file=state, handler=HANDLER_FILE,
                          export_path=export_path, config_file=CONFIG_FILE, extra_files=[names],
                          sanity=True, sample_images=write_sample_images(Path(samples)))
    return mar


def write_sample_images(directory: Path) -> list[Path]:
    """PNG shapes for the sanity checks' probes, ``SAMPLES_PER_CLASS`` of each class, in class order."""
    import numpy as np
    from PIL import Image

    from demo import shapes

    batch = shapes.generate(len(shapes.CLASS_NAMES) * SAMPLES_PER_CLASS * 8, SAMPLE_SEED)
    paths = []
    for label, name in enumerate(shapes.CLASS_NAMES):
        for count, index in enumerate(np.flatnonzero(batch.labels == label)[:SAMPLES_PER_CLASS]):
            pixels = (np.clip(batch.images[index].transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
            path = directory / f"{name}-{count}.png"
            Image.fromarray(pixels).save(path)
            paths.append(path)
    return paths


def sanity_members(mar: Path, directory: Path) -> Path:
    """The sanity checks an archive carries (``sanity.json``, ``sample_images/``), extracted into
    ``directory``: as an extra file, it gives another archive of the same weights the same checks."""
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(mar) as archive:
        for member in archive.namelist():
            if member == "sanity.json" or member.startswith("sample_images/"):
                archive.extract(member, directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-path", type=Path, default=REPO_ROOT / "model_store")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    arguments = parser.parse_args()
    print(build_demo_store(arguments.export_path, force=arguments.force))


if __name__ == "__main__":
    main()
