"""Makes the repository root importable, so tests can use ``tests.support`` helpers also when run
with a bare ``pytest`` (``python -m pytest`` adds the working directory by itself)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
