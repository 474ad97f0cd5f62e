"""Runs tests/test_triton_nearest_code.py in a fresh process when this one imported triton
before TRITON_INTERPRET=1 could be set (a whole-suite CPU run in one process), so the
interpreter tests run anyway; skipped otherwise (that module then runs in this process)."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

NEEDS_FRESH = (not torch.cuda.is_available() and "triton" in sys.modules
               and os.environ.get("TRITON_INTERPRET") != "1")


@pytest.mark.skipif(not NEEDS_FRESH, reason="test_triton_nearest_code.py runs in this process")
def test_triton_nearest_code_in_fresh_process():
    path = os.path.join(os.path.dirname(__file__), "test_triton_nearest_code.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                        "-W", "ignore::RuntimeWarning"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout, r.stdout[-2000:]
