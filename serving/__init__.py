"""Framework-neutral serving: one request in, one reply out.

Request parsing, image decoding, the model's settings (validated once, at load), cost caps,
rendering, replies and their HTTP status, and the metric vocabulary. Builds on ``explainers``;
knows nothing of TorchServe (``handlers`` adapts it).
"""
