"""Performance benchmarks: ``python -m benchmarks.run [--quick]`` (see benchmarks/README.md)."""

import os

# OpenMP threads that spin while they wait for work starve each other on a busy 2-core machine:
# a ResNet-50 input gradient measured 2.0-2.8 s with spinning waits against 0.17-0.26 s with
# passive ones, while other processes ran. This must be set before torch loads OpenMP; the run
# records it, and an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
