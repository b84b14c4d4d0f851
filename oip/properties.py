"""TorchServe's config.properties, read as its own launcher reads it."""

from __future__ import annotations

from pathlib import Path


def read_properties(path: Path) -> dict[str, str]:
    """Java-properties subset TorchServe's own launcher understands: key=value lines, # comments."""
    entries = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, _, value = line.partition("=")
            entries[key.strip()] = value.strip()
    return entries
