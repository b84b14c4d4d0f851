"""Serving-side building blocks that need no TorchServe: request image decoding and model inputs."""
