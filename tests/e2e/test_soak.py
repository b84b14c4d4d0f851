"""A short soak (`make soak` runs the long one): a real TorchServe under a few hundred mixed requests."""

from __future__ import annotations

import time

from tools.soak import request_mix, run_soak, start_server
from tools.demo_server import build_store

SHORT_SOAK_REQUESTS = 300


def test_the_request_mix_covers_every_kind_and_is_reproducible():
    jobs = request_mix(SHORT_SOAK_REQUESTS, seed=3)
    kinds = {job.kind for job in jobs}
    assert kinds == {"plain", "explain", "bad"}
    assert {name for job in jobs for name in job.explainers} >= {"integrated_gradients", "smoothgrad", "occlusion",
                                                                 "grad_cam", "guided_backprop", "saliency"}
    assert [job.body for job in request_mix(40, seed=3)] == [job.body for job in jobs[:40]]


def test_short_soak_no_unexpected_reply_and_bounded_worker_memory(tmp_path):
    store = build_store(tmp_path / "store")
    started = time.monotonic()
    with start_server(store, tmp_path / "run") as server:
        result = run_soak(server, requests=SHORT_SOAK_REQUESTS, concurrency=6, log=lambda line: None)
    print(result.summary())
    assert result.unexpected == 0 and result.server_errors == 0 and result.no_reply == 0, result.summary()
    assert not result.workers_replaced, result.summary()
    assert result.rss_growth <= 0.10, result.summary()
    assert set(result.by_kind) == {"plain", "explain", "bad"}
    assert time.monotonic() - started < 90
