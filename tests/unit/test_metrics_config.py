"""Static checks of deploy/torchserve/metrics.yaml against the metric contract (DESIGN.md section 4)."""

import os

import yaml

import ts
from handlers.torchserve_metrics import torchserve_dimensions
from serving import metrics as xai_metrics
from support.paths import REPO_ROOT

ROOT = str(REPO_ROOT)
CONFIG = os.path.join(ROOT, "deploy", "torchserve", "metrics.yaml")
TS_DEFAULT = os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml")

# DESIGN.md section 4 and the issue: name -> (type, our labels). ModelName and Level come first.
CONTRACT = {
    "xai_stage_latency_seconds": ("histogram", ["stage", "explainer"]),
    "xai_requests_total": ("counter", ["route", "outcome"]),
    "xai_errors_total": ("counter", ["code"]),
    "xai_explanation_bytes": ("histogram", ["explainer"]),
    "xai_explanations_total": ("counter", ["explainer", "outcome"]),
    "xai_explanation_quality": ("histogram", ["explainer", "metric"]),
    "xai_explainer_sanity": ("gauge", ["explainer", "check"]),
}


def _index(section):
    out = {}
    for mtype, entries in (section or {}).items():
        for entry in entries or []:
            out[entry["name"]] = (mtype, entry)
    return out


def _load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def test_only_known_keys():
    # The frontend maps the file onto a fixed Java class: an unknown key (e.g. buckets) breaks startup.
    cfg = _load(CONFIG)
    assert set(cfg) <= {"dimensions", "ts_metrics", "model_metrics"}
    for section in ("ts_metrics", "model_metrics"):
        assert set(cfg[section]) <= {"counter", "gauge", "histogram"}
        for entries in cfg[section].values():
            for entry in entries:
                assert set(entry) == {"name", "unit", "dimensions"}, entry
                assert entry["unit"] and entry["unit"].replace(" ", "").isidentifier(), entry


def test_contract_metrics_declared():
    model = _index(_load(CONFIG)["model_metrics"])
    for name, (mtype, labels) in CONTRACT.items():
        assert name in model, f"{name} missing from model_metrics"
        got_type, entry = model[name]
        assert got_type == mtype, (name, got_type)
        # Hostname is appended by the frontend; declaring it would duplicate the label.
        assert entry["dimensions"] == ["ModelName", "Level"] + labels, (name, entry["dimensions"])


def test_config_matches_what_the_handler_emits():
    # The frontend takes label values by position: the yaml order must be the order
    # TorchServeRecorder emits in (handlers.torchserve_metrics.torchserve_dimensions), type for type.
    model = _index(_load(CONFIG)["model_metrics"])
    for spec in xai_metrics.ALL_METRICS:
        assert spec.name in model, spec.name
        got_type, entry = model[spec.name]
        assert got_type == spec.kind, spec.name
        assert entry["dimensions"] == list(torchserve_dimensions(spec)), spec.name
    assert {s.name for s in xai_metrics.ALL_METRICS} == set(CONTRACT)


def test_torchserve_defaults_kept_unchanged():
    ours, default = _load(CONFIG), _load(TS_DEFAULT)
    for section in ("ts_metrics", "model_metrics"):
        mine = _index(ours[section])
        for name, (mtype, entry) in _index(default[section]).items():
            assert name in mine, f"default {section} metric {name} dropped"
            assert mine[name][0] == mtype, name
            assert mine[name][1] == entry, name


def test_no_duplicate_names():
    cfg = _load(CONFIG)
    names = [e["name"] for s in ("ts_metrics", "model_metrics") for es in cfg[s].values() for e in es]
    assert len(names) == len(set(names))
