"""Tooling to archive models and run TorchServe locally and in tests (no serving logic of its own)."""
