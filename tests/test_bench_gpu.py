"""vqkernels.bench.gpu runs end to end (its --smoke mode: tiny shapes on the CPU, Triton interpreted)
and the auto rule file it writes loads into vqkernels.set_auto_table. The GPU numbers themselves
come from benchmarks/gpu.sh on a GPU machine."""

import json

import torch

from vq_helpers import vqkernels

from vqkernels import _backend
from vqkernels.bench import gpu


def test_smoke_run_writes_report_and_auto_rules(tmp_path, capsys):
    report, auto = tmp_path / "gpu.md", tmp_path / "auto.json"
    gpu.main(["--smoke", "--output", str(report), "--save-auto", str(auto)])
    text = report.read_text()
    assert "| 64 | 8 | 32 | bfloat16 |" in text and "| ema_update_ baseline |" in text
    for op in ("vq_quantize", "ema_update_", "residual_quantize", "multiscale_quantize_step", "lfq_entropy"):
        assert f"| {op} |" in text
    assert "Summary on CPU (smoke run):" in capsys.readouterr().out
    rules = json.loads(auto.read_text())
    assert all(r["device"] == "cpu" and r["backend"] in _backend.NAMESPACES for r in rules)
    if _backend.available("triton", "nearest_code", "cpu"):
        assert {r["op"] for r in rules} >= {"nearest_code"}
    try:
        vqkernels.set_auto_table(str(auto))
        for r in rules:
            assert (2 ** 62, getattr(torch, r["dtype"]), r["backend"]) in _backend.routes(r["op"], "cpu")
    finally:
        vqkernels.set_auto_table(None)
