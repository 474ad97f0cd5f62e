"""Makes the checkout's vqkernels importable for `pytest benchmarks` when it is not installed."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
