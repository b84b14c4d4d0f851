"""Stopping a server we started in its own process group: SIGTERM, then SIGKILL, by group id."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process_group(process: subprocess.Popen, term_wait: float = 10.0, kill_wait: float = 5.0) -> None:
    """SIGTERM ``process``'s group (started with ``start_new_session=True``), and SIGKILL it if the
    leader has not exited within ``term_wait`` seconds; returns once the leader is reaped."""
    for signal_number, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, kill_wait)):
        try:
            os.killpg(process.pid, signal_number)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    process.poll()
