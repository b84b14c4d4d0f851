"""Comparing replies that differ only in how long they took."""

from __future__ import annotations


def without_timing(body):
    """``body`` with every explanation entry's ``latency_ms`` removed (a measured time, never equal
    between two requests)."""
    if isinstance(body, dict):
        return {key: without_timing(value) for key, value in body.items() if key != "latency_ms"}
    if isinstance(body, list):
        return [without_timing(item) for item in body]
    return body
