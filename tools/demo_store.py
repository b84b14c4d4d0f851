"""Builds model_store/shapes.mar, the demo model, when it is missing or older than its sources.

``python -m tools.demo_store`` trains the demo model first if its cached weights are
missing or stale (about a minute on two cores), then archives it with the explainer handler.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from demo import train as training
from demo.model_cache import BUILD_DIR, trained_demo_model
from tools.archive import archive_model, mar_is_stale

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "shapes"
MODEL_FILE = REPO_ROOT / "demo" / "allconv.py"
CONFIG_FILE = REPO_ROOT / "model_store" / "shapes" / "model-config.yaml"
HANDLER_FILE = REPO_ROOT / "handlers" / "image_explainer.py"


def build_demo_store(export_path: Path = REPO_ROOT / "model_store", build_dir: Path = BUILD_DIR,
                     force: bool = False) -> Path:
    """The path of ``shapes.mar`` in ``export_path``, (re)built if needed."""
    trained_demo_model(build_dir)
    state, names = build_dir / training.STATE_FILE, build_dir / training.INDEX_TO_NAME_FILE
    mar = Path(export_path) / f"{MODEL_NAME}.mar"
    # Only the handler file is copied into the archive; it imports the installed plugin at run time.
    sources = [MODEL_FILE, CONFIG_FILE, HANDLER_FILE, state, names]
    if force or mar_is_stale(mar, sources):
        archive_model(MODEL_NAME, model_file=MODEL_FILE, serialized_file=state, handler=HANDLER_FILE,
                      export_path=export_path, config_file=CONFIG_FILE, extra_files=[names])
    return mar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-path", type=Path, default=REPO_ROOT / "model_store")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    arguments = parser.parse_args()
    print(build_demo_store(arguments.export_path, force=arguments.force))


if __name__ == "__main__":
    main()
