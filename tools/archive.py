"""Build TorchServe model archives (.mar), rebuilding only when their sources changed.

Three ways in:

- You have a model-config.yaml: pass it with --config; --class-names is packed beside it as is.
- "Bring your own model": give the model file, state dict, class names and input size, and a
  model-config.yaml is written for the project's handler (batching, workers, and a `handler:`
  section the handler reads through ctx.model_yaml_config):

    python -m tools.archive --name mymodel --model-file net.py --serialized-file net.pt \
        --class-names index_to_name.json --input-size 224 224 \
        --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 --export-path model_store

- A torchvision or timm architecture by name with its state dict: no model file; the handler
  builds the architecture (``handler.architecture``) and the written config carries that model's
  standard preprocessing, read offline from the library's metadata (nothing is downloaded):

    python -m tools.archive --name resnet50 --torchvision resnet50 --serialized-file w.pt --export-path model_store
    python -m tools.archive --name convnext --timm convnext_tiny --serialized-file w.pt --export-path model_store

  --input-size, --resize, --interpolation, --mean/--std and --class-names override the metadata.

Checks go through the handler's own settings type, which loads torch: it is imported where a config
is checked, so importing this module (the demo store, the tests) stays cheap.

torch-model-archiver stages files in $TMPDIR/<model name> and deletes that directory first, so two
builds of the same name sharing a temp dir would corrupt each other: each build here gets its own.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HANDLER = PROJECT_ROOT / "handlers" / "image_explainer.py"
MODEL_CONFIG_NAME = "model-config.yaml"
# What a handler needs of this project at run time; --bundle-plugin copies these packages into the
# archive for servers where the plugin cannot be installed (torch, captum, Pillow, numpy and
# pyyaml must still be there: they come with TorchServe's own environment or the image).
PLUGIN_PACKAGES = ("explainers", "serving", "handlers")
CLASS_NAMES_NAME = "class_names.json"


# -- model-config.yaml -------------------------------------------------------------------------


def model_config(
    *,
    input_size: Sequence[int],
    class_names: str | Sequence[str],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize: int | None = None,
    interpolation: str | None = None,
    architecture: str | None = None,
    top_k: int = 3,
    batch_size: int = 4,
    max_batch_delay_ms: int = 50,
    min_workers: int = 1,
    max_workers: int = 1,
    response_timeout_s: int = 120,
) -> dict[str, Any]:
    """model-config.yaml contents: TorchServe's keys at the top, ours under `handler:`.

    The frontend reads batchSize, maxBatchDelay (ms), min/maxWorkers and responseTimeout (s) from
    the archive; the worker hands the whole parsed file to the handler as ctx.model_yaml_config.
    """
    handler: dict[str, Any] = {}
    if architecture is not None:
        handler["architecture"] = architecture
    handler["input_size"] = list(normalise_input_size(input_size))
    if resize is not None:
        handler["resize"] = resize
    if interpolation is not None:
        handler["interpolation"] = interpolation
    if mean is not None or std is not None:
        handler["mean"] = mean if mean is None else [float(value) for value in mean]
        handler["std"] = std if std is None else [float(value) for value in std]
    handler["class_names"] = class_names if isinstance(class_names, str) else list(class_names)
    handler["top_k"] = int(top_k)
    _check_handler_section(handler)
    return {
        "minWorkers": min_workers,
        "maxWorkers": max_workers,
        "batchSize": batch_size,
        "maxBatchDelay": max_batch_delay_ms,
        "responseTimeout": response_timeout_s,
        "handler": handler,
    }


def normalise_input_size(input_size: Sequence[int] | int) -> tuple[int, int]:
    """224 -> (224, 224); [H, W] -> (H, W), as the handler's settings read it."""
    from serving.settings import parse_input_size

    sizes = [input_size] if isinstance(input_size, int) else list(input_size)
    return parse_input_size(sizes[0] if len(sizes) == 1 else sizes)


def _check_handler_section(handler: Mapping[str, Any]) -> None:
    """Loads the section as the handler will, so an archive this tool writes always loads.

    Raises:
        InvalidOptionError (a ValueError): what the handler would refuse at model load.
    """
    from serving.settings import ServingSettings

    ServingSettings.from_mapping(handler)


def render_model_config(config: Mapping[str, Any]) -> str:
    return "# Written by tools.archive.\n" + yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=None)


# -- archiving ---------------------------------------------------------------------------------


def archiver_command() -> list[str]:
    """The torch-model-archiver of the running interpreter's environment."""
    script = Path(sys.executable).with_name("torch-model-archiver")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "model_archiver.model_packaging"]


def archive_model(
    name: str,
    *,
    model_file: Path | str | None,
    serialized_file: Path | str,
    handler: Path | str,
    export_path: Path | str,
    config_file: Path | str | None = None,
    extra_files: Iterable[Path | str] = (),
    version: str = "1.0",
    bundle_plugin: bool = False,
    sanity: bool = False,
    sample_images: Iterable[Path | str] = (),
) -> Path:
    """Run torch-model-archiver (--force) and return the .mar path.

    Every file lands at the archive root under its base name (a directory in extra_files
    contributes its contents), which is where the handler finds them at runtime. Without a
    model file, the config's ``handler.architecture`` names the model.
    bundle_plugin: also put the plugin's packages (PLUGIN_PACKAGES, from wherever they are
    imported now, the installed wheel or this checkout) at the archive root, which TorchServe puts
    on the worker's sys.path: the archive then serves where the plugin is not installed.
    sanity: measure every allowed explainer's sanity checks now (the project's handler and a
    config_file are needed) and store them as sanity.json, with ``sample_images`` (the probes, else
    generated ones) in sample_images/: the handler then reads them at load instead of measuring.
    """
    sample_images = list(sample_images)
    if sanity or sample_images:
        with tempfile.TemporaryDirectory(prefix="sanity-bundle-") as bundle:
            stage_sanity(Path(bundle), model_file=model_file, serialized_file=serialized_file,
                         config_file=config_file, extra_files=extra_files, sample_images=sample_images,
                         measure_now=sanity)
            return archive_model(name, model_file=model_file, serialized_file=serialized_file, handler=handler,
                                 export_path=export_path, config_file=config_file,
                                 extra_files=[*extra_files, bundle], version=version, bundle_plugin=bundle_plugin)
    if bundle_plugin:
        with tempfile.TemporaryDirectory(prefix="plugin-bundle-") as bundle:
            for package in PLUGIN_PACKAGES:
                source = Path(importlib.import_module(package).__path__[0])
                shutil.copytree(source, Path(bundle) / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            return archive_model(name, model_file=model_file, serialized_file=serialized_file, handler=handler,
                                 export_path=export_path, config_file=config_file,
                                 extra_files=[*extra_files, bundle], version=version)
    sources = [*([Path(model_file)] if model_file else []), Path(serialized_file), Path(handler)]
    sources += [Path(config_file)] if config_file else []
    extras = [Path(path) for path in extra_files]
    for path in sources + extras:
        if not path.exists():
            raise FileNotFoundError(f"archive source not found: {path}")
    export_dir = Path(export_path)
    export_dir.mkdir(parents=True, exist_ok=True)
    command = archiver_command() + [
        "--model-name", name,
        "--version", version,
        *(["--model-file", str(model_file)] if model_file else []),
        "--serialized-file", str(serialized_file),
        "--handler", str(handler),
        "--export-path", str(export_dir),
        "--force",
    ]  # fmt: skip
    if config_file:
        command += ["--config-file", str(config_file)]
    if extras:
        command += ["--extra-files", ",".join(str(path) for path in extras)]
    with tempfile.TemporaryDirectory(prefix="mar-staging-") as staging:
        environment = {**os.environ, "TMPDIR": staging, "TEMP": staging, "TMP": staging}
        result = subprocess.run(command, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return export_dir / f"{name}.mar"


def archive_own_model(
    name: str,
    *,
    model_file: Path | str | None,
    serialized_file: Path | str,
    class_names: Path | str,
    input_size: Sequence[int] | int,
    export_path: Path | str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    handler: Path | str = DEFAULT_HANDLER,
    extra_files: Iterable[Path | str] = (),
    version: str = "1.0",
    bundle_plugin: bool = False,
    sanity: bool = False,
    sample_images: Iterable[Path | str] = (),
    **config_options: Any,
) -> Path:
    """Bring your own model: write model-config.yaml and class_names.json, then archive.

    The class names are normalised to a JSON list whatever form they came in. config_options go
    to `model_config` (resize, interpolation, architecture, top_k, batch_size, ...); without a
    model file they must name the architecture.
    """
    generated = own_model_generated_files(class_names, input_size, mean, std, **config_options)
    return _archive_generated(name, generated, model_file=model_file, serialized_file=serialized_file,
                              handler=handler, export_path=export_path, extra_files=extra_files, version=version,
                              bundle_plugin=bundle_plugin, sanity=sanity, sample_images=sample_images)


def own_model_generated_files(
    class_names: Path | str | Sequence[str],
    input_size: Sequence[int] | int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **config_options: Any,
) -> dict[str, bytes]:
    """The files `archive_own_model` writes, by archive member name (also used to detect staleness)."""
    from serving.class_names import load_class_names

    names = load_class_names(class_names)
    config = model_config(input_size=input_size, class_names=names, mean=mean, std=std, **config_options)
    config["handler"]["class_names"] = CLASS_NAMES_NAME  # packed beside the config, as a list
    return {
        MODEL_CONFIG_NAME: render_model_config(config).encode(),
        CLASS_NAMES_NAME: (json.dumps(names, indent=1) + "\n").encode(),
    }


# -- torchvision and timm models by name ----------------------------------------------------------


def standard_preprocessing(source: str, name: str) -> dict[str, Any]:
    """A library model's standard preprocessing and class names, read offline from its metadata.

    Returns ``{"input_size", "resize", "interpolation", "mean", "std", "class_names"}``;
    ``class_names`` is None when the metadata has none (a timm head that is not ImageNet's: give
    --class-names).

    Raises:
        ValueError: an unknown source or model, or a pipeline the handler cannot reproduce.
    """
    if source == "torchvision":
        return _torchvision_preprocessing(name)
    if source == "timm":
        return _timm_preprocessing(name)
    raise ValueError(f"unknown model source {source!r}; known: torchvision, timm")


def _torchvision_preprocessing(name: str) -> dict[str, Any]:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"torchvision {torchvision.__version__} has no classification model {name!r}")
    weights = torchvision.models.get_model_weights(name).DEFAULT
    transform = weights.transforms()  # ImageClassification: Resize(resize_size) + CenterCrop(crop_size)
    return {
        "input_size": list(transform.crop_size),
        "resize": int(transform.resize_size[0]),
        "interpolation": transform.interpolation.value,
        "mean": [float(value) for value in transform.mean],
        "std": [float(value) for value in transform.std],
        "class_names": unique_class_names(weights.meta["categories"]),
    }


def _timm_preprocessing(name: str) -> dict[str, Any]:
    import math

    import timm
    from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_data_config

    if not timm.is_model(name):
        raise ValueError(f"timm {timm.__version__} has no model {name!r}")
    model = timm.create_model(name, pretrained=False)
    config = resolve_data_config({}, model=model)
    subset = infer_imagenet_subset(model)  # None unless the head is an ImageNet one timm ships names for
    # timm's descriptions list synonyms ("tench, Tinca tinca"): the first is the label users read.
    class_names = None if subset is None else unique_class_names(
        [description.split(", ")[0] for description in ImageNetInfo(subset).label_descriptions()])
    if config.get("crop_mode", "center") != "center":
        raise ValueError(f"timm {name} crops with mode {config['crop_mode']!r}; the handler reproduces 'center' "
                         "only: give --input-size, --resize and --interpolation yourself")
    height, width = config["input_size"][1:]
    crop_pct = config.get("crop_pct") or 1.0
    return {
        "input_size": [height, width],
        # timm's eval transform: the shorter side to floor(crop / crop_pct), then the centre crop.
        "resize": max(math.floor(height / crop_pct), math.floor(width / crop_pct)),
        "interpolation": config["interpolation"],
        "mean": [float(value) for value in config["mean"]],
        "std": [float(value) for value in config["std"]],
        "class_names": class_names,
    }


def unique_class_names(names: Sequence[str]) -> list[str]:
    """Names a request can target: a name that occurs more than once (ImageNet has two "crane"s and
    two "maillot"s) gets its class index appended, ``crane (134)`` and ``crane (517)``."""
    repeated = {name for name in names if list(names).count(name) > 1}
    return [f"{name} ({index})" if name in repeated else name for index, name in enumerate(names)]


def archive_architecture(
    name: str,
    *,
    source: str,
    architecture_name: str,
    serialized_file: Path | str,
    export_path: Path | str,
    class_names: Path | str | Sequence[str] | None = None,
    handler: Path | str = DEFAULT_HANDLER,
    extra_files: Iterable[Path | str] = (),
    version: str = "1.0",
    bundle_plugin: bool = False,
    sanity: bool = False,
    sample_images: Iterable[Path | str] = (),
    **config_options: Any,
) -> Path:
    """A torchvision or timm model by name: its standard preprocessing (``config_options`` such as
    input_size, resize, interpolation, mean, std override it), no model file.

    Raises:
        ValueError: see :func:`architecture_generated_files`.
    """
    generated = architecture_generated_files(source, architecture_name, class_names, **config_options)
    return _archive_generated(name, generated, model_file=None, serialized_file=serialized_file, handler=handler,
                              export_path=export_path, extra_files=extra_files, version=version,
                              bundle_plugin=bundle_plugin, sanity=sanity, sample_images=sample_images)


def architecture_generated_files(
    source: str,
    architecture_name: str,
    class_names: Path | str | Sequence[str] | None = None,
    **config_options: Any,
) -> dict[str, bytes]:
    """model-config.yaml and class_names.json for a library model (see :func:`archive_architecture`).

    Raises:
        ValueError: unknown model, no class names in the metadata and none given, or settings the
            handler would refuse (InvalidOptionError is a ValueError).
    """
    standard = standard_preprocessing(source, architecture_name)
    standard_names = standard.pop("class_names")
    names = class_names if class_names is not None else standard_names
    if names is None:
        raise ValueError(f"{source} {architecture_name} carries no class names: give --class-names")
    overrides = {key: value for key, value in config_options.items() if value is not None}
    return own_model_generated_files(names, **{**standard, **overrides}, architecture=f"{source}:{architecture_name}")


def _archive_generated(name: str, generated: Mapping[str, bytes], *, model_file, serialized_file, handler,
                       export_path, extra_files, version, bundle_plugin: bool = False, sanity: bool = False,
                       sample_images: Iterable[Path | str] = ()) -> Path:
    with tempfile.TemporaryDirectory(prefix="byo-model-") as staging:
        staged = []
        for file_name, content in generated.items():
            (Path(staging) / file_name).write_bytes(content)
            staged.append(Path(staging) / file_name)
        return archive_model(
            name,
            model_file=model_file,
            serialized_file=serialized_file,
            handler=handler,
            export_path=export_path,
            config_file=Path(staging) / MODEL_CONFIG_NAME,
            extra_files=[Path(staging) / CLASS_NAMES_NAME, *extra_files],
            version=version,
            bundle_plugin=bundle_plugin,
            sanity=sanity,
            sample_images=sample_images,
        )


# -- sanity checks at archive time ---------------------------------------------------------------


def stage_sanity(bundle: Path, *, model_file: Path | str | None, serialized_file: Path | str, config_file: Path | str | None,
                 extra_files: Iterable[Path | str] = (), sample_images: Iterable[Path | str] = (),
                 measure_now: bool = True) -> None:
    """Puts ``sample_images/`` (copies, in the order given) and, when ``measure_now``, ``sanity.json``
    in ``bundle``, whose contents the archive carries at its root.

    The model is loaded and the checks run as the handler will run them at load
    (:func:`serving.sanity.load_or_measure`), so the stored fingerprints match there.

    Raises:
        FileNotFoundError: a sample image or the class names file the config names is missing.
        InvalidOptionError: the config's handler section is invalid, or there is no config.
    """
    from serving.sanity import SAMPLE_IMAGE_SUFFIXES, SAMPLE_IMAGES_DIR

    images = [Path(path) for path in sample_images]
    if images:
        folder = bundle / SAMPLE_IMAGES_DIR
        folder.mkdir(parents=True)
        for index, image in enumerate(images):
            if not image.is_file():
                raise FileNotFoundError(f"sample image not found: {image}")
            if image.suffix.lower() not in SAMPLE_IMAGE_SUFFIXES:
                raise ValueError(f"sample image {image} is not one of {list(SAMPLE_IMAGE_SUFFIXES)}")
            shutil.copyfile(image, folder / f"{index:02d}-{image.name}")
    if measure_now:
        measure_sanity(bundle, model_file=model_file, serialized_file=serialized_file, config_file=config_file,
                       extra_files=extra_files)


def measure_sanity(model_dir: Path, *, model_file: Path | str | None, serialized_file: Path | str,
                   config_file: Path | str | None, extra_files: Iterable[Path | str] = ()):
    """Measures the checks for the model and config, writing ``model_dir/sanity.json``; the report."""
    import torch

    from explainers.errors import InvalidOptionError
    from handlers.model_loading import load_architecture, load_eager_model
    from serving.sanity import load_or_measure
    from serving.settings import ServingSettings

    if config_file is None:
        raise InvalidOptionError("sanity checks at archive time need the model's model-config.yaml")
    section = (yaml.safe_load(Path(config_file).read_text()) or {}).get("handler", {})
    names = section.get("class_names")
    base_dir = Path(config_file).parent
    if isinstance(names, str):
        # The archive puts extra files at its root beside the config: look for the names there too.
        base_dir = next((Path(path).parent for path in extra_files if Path(path).name == names), base_dir)
    settings = ServingSettings.from_mapping(section, base_dir)
    # As the handler loads it: the architecture the settings name, else the model file's class.
    if settings.architecture is not None:
        model = load_architecture(settings.architecture, settings.num_classes, Path(serialized_file), torch.device("cpu"))
    elif model_file is not None:
        model = load_eager_model(Path(model_file), Path(serialized_file), torch.device("cpu"))
    else:
        raise InvalidOptionError("sanity checks at archive time need a model file or an architecture")
    return load_or_measure(model, settings, model_dir, at_load=False)


# -- staleness ---------------------------------------------------------------------------------


def mar_is_stale(mar: Path | str, sources: Iterable[Path | str], generated: Mapping[str, bytes] | None = None) -> bool:
    """Whether `mar` must be (re)built: missing, unreadable, older than a source file (files in a
    source directory count), or holding a generated member whose content is no longer what we
    would write (options changed without any file changing)."""
    mar = Path(mar)
    if not mar.is_file():
        return True
    built_at = mar.stat().st_mtime
    for source in map(Path, sources):
        files = [path for path in source.rglob("*") if path.is_file()] if source.is_dir() else [source]
        if any(not path.exists() or path.stat().st_mtime > built_at for path in files):
            return True
    if generated:
        try:
            with zipfile.ZipFile(mar) as archive:
                return any(archive.read(member) != content for member, content in generated.items())
        except (zipfile.BadZipFile, KeyError):
            return True
    return False


def read_archived_model_config(mar: Path | str) -> dict[str, Any]:
    """The parsed model-config.yaml inside a .mar (as TorchServe will hand it to the handler)."""
    with zipfile.ZipFile(mar) as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        config_name = manifest["model"].get("configFile")
        return yaml.safe_load(archive.read(config_name)) if config_name else {}


# -- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.archive",
        description="Build a TorchServe .mar: your model file (with --config or --input-size), or a torchvision "
                    "or timm model by name with its standard preprocessing.",
    )
    parser.add_argument("--name", required=True, help="model name (also the archive's file name)")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model-file", type=Path, help="Python file defining one nn.Module class")
    model.add_argument("--torchvision", metavar="NAME", help="a torchvision classification model, e.g. resnet50")
    model.add_argument("--timm", metavar="NAME", help="a timm model, e.g. convnext_tiny")
    parser.add_argument("--serialized-file", required=True, type=Path, help="state dict (.pt/.pth)")
    parser.add_argument("--handler", type=Path, default=DEFAULT_HANDLER, help="handler file (default: %(default)s)")
    parser.add_argument("--class-names", type=Path, help="JSON list of names or index_to_name map")
    parser.add_argument("--export-path", required=True, type=Path, help="directory for NAME.mar")
    parser.add_argument("--extra-files", nargs="+", default=[], type=Path, help="more files for the archive root")
    parser.add_argument("--version", default="1.0", help="model version (default: %(default)s)")
    parser.add_argument("--if-stale", action="store_true", help="do nothing when NAME.mar is newer than its sources")
    parser.add_argument("--sample-images", nargs="+", default=[], type=Path, metavar="IMAGE",
                        help="probe images for the sanity checks, carried in the archive (default: generated probes)")
    parser.add_argument("--no-sanity", action="store_true",
                        help="do not measure the explainers' sanity checks now (the handler then measures them at load)")
    parser.add_argument("--bundle-plugin", action="store_true",
                        help=f"carry the plugin's packages ({', '.join(PLUGIN_PACKAGES)}) in the archive, for servers where it is not installed")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="an existing model-config.yaml (with --model-file)")
    source.add_argument("--input-size", type=int, nargs="+", metavar="PIXELS",
                        help="height [width]: write model-config.yaml for this input size (with --torchvision/--timm: "
                             "instead of the model's own)")
    own = parser.add_argument_group("written model-config.yaml (with --input-size, --torchvision or --timm)")
    own.add_argument("--resize", type=int, help="shorter image side before the centre crop to the input size "
                                                "(default: none, a direct resize; by name: the model's own)")
    own.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"),
                     help="resize filter (default: bilinear; by name: the model's own)")
    own.add_argument("--mean", type=float, nargs="+", help="per-channel mean of the model's normalisation")
    own.add_argument("--std", type=float, nargs="+", help="per-channel std of the model's normalisation")
    own.add_argument("--top-k", type=int, default=3, help="predictions per response (default: %(default)s)")
    own.add_argument("--batch-size", type=int, default=4, help="TorchServe batchSize (default: %(default)s)")
    own.add_argument("--max-batch-delay", type=int, default=50, help="TorchServe maxBatchDelay in ms (default: %(default)s)")
    own.add_argument("--workers", type=int, default=1, help="min and max workers (default: %(default)s)")
    own.add_argument("--response-timeout", type=int, default=120, help="seconds (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(parser, args)
    except (FileNotFoundError, RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    mar = args.export_path / f"{args.name}.mar"
    options = dict(
        top_k=args.top_k,
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay,
        min_workers=args.workers,
        max_workers=args.workers,
        response_timeout_s=args.response_timeout,
    )
    preprocessing = dict(resize=args.resize, interpolation=args.interpolation)
    # Only the project's handler reads sanity.json; another handler's archive is left as it was.
    sanity = dict(sanity=not args.no_sanity and args.handler.resolve() == DEFAULT_HANDLER.resolve(),
                  sample_images=args.sample_images)
    if args.torchvision or args.timm:
        return _run_by_name(parser, args, mar, {**options, **preprocessing}, sanity)
    sources = [args.model_file, args.serialized_file, args.handler, *args.extra_files, *args.sample_images]
    if args.config:
        extra_files = [*([args.class_names] if args.class_names else []), *args.extra_files]
        if args.if_stale and not mar_is_stale(mar, [*sources, args.config, *extra_files]):
            print(f"{mar} is up to date")
            return 0
        built = archive_model(
            args.name,
            model_file=args.model_file,
            serialized_file=args.serialized_file,
            handler=args.handler,
            export_path=args.export_path,
            config_file=args.config,
            extra_files=extra_files,
            version=args.version,
            bundle_plugin=args.bundle_plugin,
            **sanity,
        )
    else:
        if args.input_size is None:
            parser.error("--model-file needs --config or --input-size")
        if args.class_names is None:
            parser.error("--input-size needs --class-names")
        options.update({key: value for key, value in preprocessing.items() if value is not None})
        try:
            generated = own_model_generated_files(args.class_names, args.input_size, args.mean, args.std, **options)
        except ValueError as error:
            parser.error(str(error))
        if args.if_stale and not mar_is_stale(mar, [*sources, args.class_names], generated):
            print(f"{mar} is up to date")
            return 0
        built = archive_own_model(
            args.name,
            model_file=args.model_file,
            serialized_file=args.serialized_file,
            class_names=args.class_names,
            input_size=args.input_size,
            export_path=args.export_path,
            mean=args.mean,
            std=args.std,
            handler=args.handler,
            extra_files=args.extra_files,
            version=args.version,
            bundle_plugin=args.bundle_plugin,
            **sanity,
            **options,
        )
    print(f"built {built}")
    return 0


def _run_by_name(parser: argparse.ArgumentParser, args: argparse.Namespace, mar: Path, options: dict,
                 sanity: dict) -> int:
    if args.config:
        parser.error("--config goes with --model-file; with --torchvision/--timm the config is written")
    source, architecture_name = ("torchvision", args.torchvision) if args.torchvision else ("timm", args.timm)
    overrides = dict(options, input_size=args.input_size, mean=args.mean, std=args.std)
    try:
        generated = architecture_generated_files(source, architecture_name, args.class_names, **overrides)
    except ValueError as error:
        parser.error(str(error))
    sources = [args.serialized_file, args.handler, *args.extra_files, *args.sample_images,
               *([args.class_names] if args.class_names else [])]
    if args.if_stale and not mar_is_stale(mar, sources, generated):
        print(f"{mar} is up to date")
        return 0
    built = _archive_generated(args.name, generated, model_file=None, serialized_file=args.serialized_file,
                               handler=args.handler, export_path=args.export_path, extra_files=args.extra_files,
                               version=args.version, bundle_plugin=args.bundle_plugin, **sanity)
    print(f"built {built}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
