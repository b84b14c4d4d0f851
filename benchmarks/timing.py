"""Interleaved timing on a noisy machine: rounds, rotated order, medians of per-round ratios.

Every case runs once per round, in an order rotated from round to round, so a slow spell of the
machine (other processes on 2 cores) hits all cases alike. Ratios are computed within each round
(both sides measured seconds apart) and summarised by their median and interquartile range.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch.profiler import ProfilerActivity, profile


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if len(ordered) == 1:
        return {"median": ordered[0], "p25": ordered[0], "p75": ordered[0], "min": ordered[0], "max": ordered[0], "n": 1}
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"median": statistics.median(ordered), "p25": q1, "p75": q3, "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def _synchronize() -> None:
    """Wait for queued GPU work, so a CUDA case's time is its work and not its launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Times(dict):
    """Wall-clock seconds per call of every case; ``.cpu`` holds this process's CPU seconds alike.

    CPU time (all threads of this process) is a cross-check on a shared machine: time the process
    spends preempted by others counts in wall time only.
    """

    def __init__(self, names):
        super().__init__((name, []) for name in names)
        self.cpu: dict[str, list[float]] = {name: [] for name in names}


def interleaved(cases: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1,
                budget_s: float | None = None) -> Times:
    """Seconds per call of every case, ``rounds`` times each (fewer if ``budget_s`` runs out)."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    _synchronize()
    times = Times(names)
    started = time.perf_counter()
    for round_index in range(rounds):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        if round_index % 2:
            order.reverse()
        for name in order:
            _synchronize()
            begin, begin_cpu = time.perf_counter(), time.process_time()
            cases[name]()
            _synchronize()
            times[name].append(time.perf_counter() - begin)
            times.cpu[name].append(time.process_time() - begin_cpu)
        if budget_s is not None and round_index >= 2 and time.perf_counter() - started > budget_s:
            break
    return times


def ratio(times: Mapping[str, list[float]], numerator: str, denominator: str) -> dict[str, float]:
    """Median and quartiles of numerator/denominator, round by round."""
    per_round = [a / b for a, b in zip(times[numerator], times[denominator])]
    return quantiles(per_round)


def summary_ms(values: list[float]) -> dict[str, float]:
    stats = quantiles(values)
    return {key: (round(value * 1e3, 2) if key != "n" else value) for key, value in stats.items()}


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak of tensor memory allocated while ``fn`` runs (CPU allocator events of the profiler).

    Counts what torch allocates and frees, in time order, from zero at the call: the working set
    the call adds on top of what already existed. On CUDA, the allocator's own peak statistic.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    changes = sorted((event.time_range.start, event.self_cpu_memory_usage)
                     for event in profiler.events() if event.self_cpu_memory_usage)
    current = peak = 0
    for _, change in changes:
        current += change
        peak = max(peak, current)
    return peak
