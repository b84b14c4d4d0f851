"""Test tiers, by folder: unit (library and pure parts), service (the request service and the
handler in-process), models (every method on real torchvision and timm architectures), e2e (real
TorchServe, Prometheus and other servers). `make test-fast` runs the first two; `make test` all."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TIERS = ("unit", "service", "models", "e2e")


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


def pytest_sessionfinish(session, exitstatus):
    # The models tier's table of models x methods, where $XAI_MODEL_TABLE names a file for it.
    battery = sys.modules.get("support.battery")
    if battery is not None:
        battery.write_table()
