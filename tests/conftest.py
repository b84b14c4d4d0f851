"""Test tiers, by folder: unit (library and pure parts), service (the request service and the
handler in-process), e2e (real TorchServe, Prometheus and other servers). `make test-fast` runs
the first two; `make test` all three."""

from __future__ import annotations

from pathlib import Path

import pytest

TIERS = ("unit", "service", "e2e")


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
