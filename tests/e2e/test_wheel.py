"""The built wheel is a working plugin away from this checkout.

The wheel is built and pip-installed into a fresh virtual environment whose only other packages
are this environment's dependencies (a .pth line: cheap, no download, and it does not run this
environment's editable-install hook, so the checkout cannot leak in). From a directory outside the
checkout, that environment's archive tool builds two .mar files of the demo model: one whose
handler imports the installed package, served there; one that carries the plugin
(--bundle-plugin), served from a third environment where the plugin is not installed at all.
"""

from __future__ import annotations

import email
import json
import os
import site
import subprocess
import sys
import textwrap
import venv
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from demo.model_cache import BUILD_DIR
from tools.demo_server import build_store

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_CONFIG = REPO_ROOT / "model_store" / "shapes" / "model-config.yaml"

# Runs inside the fresh environments (cwd outside the checkout): archive with the installed tool
# or serve an archive, predict and explain, stop.
SERVE_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    mode, store, run_dir, png = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]).read_bytes()
    from tools.torchserve import TorchServeProcess
    metrics = {"metrics_mode": "prometheus", "metrics_config": sys.argv[5]}
    with TorchServeProcess(store, {"shapes": "shapes.mar"}, run_dir, config=metrics) as server:
        predict = server.request("POST", "/predictions/shapes", png, {"Content-Type": "image/png"}, timeout=60)
        explain = server.request("POST", "/explanations/shapes", png, {"Content-Type": "image/png"}, timeout=60)
        print(json.dumps({"predict": [predict.status, predict.json()], "explain": [explain.status, explain.json()]}))
''')


def make_environment(path: Path, dependencies: str, with_pip: bool = False) -> Path:
    venv.EnvBuilder(with_pip=with_pip, symlinks=True).create(path)
    python = path / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "project-dependencies.pth").write_text(dependencies + "\n")
    # The torchserve launcher must run this environment's python: TorchServe starts its workers
    # with the launcher's interpreter.
    launcher = path / "bin" / "torchserve"
    launcher.write_text(f"#!{python}\nimport sys\nfrom ts.model_server import start\nsys.exit(start())\n")
    launcher.chmod(0o755)
    return python


def run(command, cwd, timeout=300) -> str:
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environment["OMP_WAIT_POLICY"] = "PASSIVE"
    result = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env=environment)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("wheel-build")
    # --no-build-isolation: setuptools comes from this environment (no index needed); the build
    # dir is outside the checkout so no build/ folder is left there.
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, REPO_ROOT], cwd=build)
    (wheel,) = out.glob("torchserve_xai-*.whl")
    return wheel


def test_wheel_holds_the_plugin_and_declares_its_dependencies(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata_name = next(name for name in names if name.endswith(".dist-info/METADATA"))
        metadata = email.message_from_string(archive.read(metadata_name).decode())
    for module in ("handlers/image_explainer.py", "handlers/model_loading.py", "handlers/torchserve_metrics.yaml", "explainers/__init__.py",
                   "serving/service.py", "tools/archive.py", "tools/torchserve.py",
                   "tools/kserve_config.py", "tools/serve_kserve.py", "oip/__main__.py", "oip/model.py", "demo/allconv.py"):
        assert module in names, module
    assert not any(name.startswith("tests/") for name in names)
    requirements = metadata.get_all("Requires-Dist")
    for needed in ("torch", "torchserve==0.12.0", "torch-model-archiver==0.12.0", "captum", "numpy", "pillow", "pyyaml"):
        assert any(requirement.replace(" ", "").startswith(needed) for requirement in requirements), needed
    assert "vision" in metadata.get_all("Provides-Extra")
    assert any("torchvision" in r and "extra" in r for r in requirements)  # optional, not required
    assert metadata["Requires-Python"] == ">=3.10"
    # The OIP front server: its extra, and the command the runtime image's pods run.
    assert any(r.replace(" ", "").startswith("kserve==") and 'extra=="kserve"' in r.replace(" ", "") for r in requirements)
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        assert "torchserve-xai-oip = oip.__main__:main" in archive.read(entry_points).decode()


def test_installed_wheel_archives_and_serves_with_and_without_the_plugin_installed(wheel, tmp_path):
    build_store(tmp_path / "demo-store")  # trains the demo model once (cached) for its weights
    dependencies = site.getsitepackages()[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "serve.py").write_text(SERVE_SCRIPT)
    png = outside / "circle.png"
    from tools.demo_server import shape_png
    png.write_bytes(shape_png("circle"))

    installed = make_environment(tmp_path / "installed", dependencies)
    run([sys.executable, "-m", "pip", "--python", installed, "install", "--no-deps", "--no-index", "-q", wheel], cwd=outside)
    where = run([installed, "-c", "import handlers.image_explainer as h, explainers, tools.archive as a; "
                 "print(h.__file__); print(explainers.__file__); print(a.DEFAULT_HANDLER)"], cwd=outside).split()
    prefix = str(tmp_path / "installed")
    assert all(path.startswith(prefix) for path in where), where  # the wheel's copy, not the checkout's

    common = ["--name", "shapes", "--serialized-file", BUILD_DIR / "allconv_state.pt", "--config", MODEL_CONFIG,
              "--extra-files", BUILD_DIR / "index_to_name.json"]
    model_file = run([installed, "-c", "import demo.allconv as m; print(m.__file__)"], cwd=outside).strip()
    plain_store, bundled_store = tmp_path / "plain-store", tmp_path / "bundled-store"
    run([installed, "-m", "tools.archive", "--model-file", model_file, *common, "--export-path", plain_store], cwd=outside)
    run([installed, "-m", "tools.archive", "--model-file", model_file, *common, "--export-path", bundled_store,
         "--bundle-plugin"], cwd=outside)
    with zipfile.ZipFile(plain_store / "shapes.mar") as archive:
        assert not any(name.startswith(("explainers/", "serving/", "handlers/")) for name in archive.namelist())
    with zipfile.ZipFile(bundled_store / "shapes.mar") as archive:
        assert {"explainers/__init__.py", "serving/service.py", "handlers/image_explainer.py"} <= set(archive.namelist())

    # The plugin-free environment: TorchServe and the dependencies only, plus our TorchServeProcess
    # helper copied beside the script (it is test tooling there, not the plugin).
    bare = make_environment(tmp_path / "bare", dependencies)
    tools = outside / "helpers"
    (tools / "tools").mkdir(parents=True)
    for module in ("__init__.py", "torchserve.py", "http_client.py", "ports.py"):
        (tools / "tools" / module).write_bytes((Path(where[2]).parent.parent / "tools" / module).read_bytes())
    run([bare, "-c", "import importlib.util, sys; sys.exit(any(importlib.util.find_spec(p) is not None "
         "for p in ('explainers', 'serving', 'handlers')))"], cwd=outside)

    commands = []
    for python, store, extra_path in ((installed, plain_store, None), (bare, bundled_store, tools)):
        metrics_config = Path(where[0]).parent / "torchserve_metrics.yaml"  # shipped in the wheel
        command = [python, "serve.py", "plain", store, tmp_path / f"run-{store.name}", png, metrics_config]
        if extra_path:
            command = [python, "-c", f"import sys, runpy; sys.path.insert(0, {str(extra_path)!r}); "
                       f"sys.argv = {[str(part) for part in command[1:]]!r}; runpy.run_path('serve.py', run_name='__main__')"]
        commands.append(command)
    # Both servers at once: most of each start is the JVM and the model load.
    with ThreadPoolExecutor(2) as pool:
        outputs = list(pool.map(lambda command: run(command, cwd=outside), commands))
    for output in outputs:
        replies = json.loads(output.strip().splitlines()[-1])
        assert replies["predict"][0] == 200 and replies["predict"][1]["predictions"][0]["label"] == "circle", replies
        assert replies["explain"][0] == 200 and set(replies["explain"][1]["explanations"]) == {"guided_backprop", "grad_cam"}
