"""The top-k choice benchmark: what it times and reports, at a size that runs in a second."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from multihead.backends import native
from multihead.backends.native import select
from multihead.patterns import Causal, TopK

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "topk_choice.py"
needs_kernel = pytest.mark.skipif(native.kernel() is None, reason="native kernel not built")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("topk_choice_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measure_reports_every_path_and_the_rows_screened(bench, monkeypatch, dtype):
    monkeypatch.setattr(select, "SCREEN_KEYS", 64)  # screen at this size where the CPU can
    monkeypatch.setattr(select, "SCREEN_RATIO", 1)
    row = bench.measure(256, "TopK(4) & Causal()", TopK(4), Causal(), dtype, repeats=1)
    screens = select.screens() if dtype == torch.float32 else []
    assert row["rows"] == 8 * 256 and row["screened_rows"] == (8 * 256 if screens else 0)
    assert row["screened_by"] == (screens[0] if screens else "")
    bf16 = "bf16" in screens
    paths = ["kernel", "unfused", "dense"] + (["no screen"] if dtype == torch.float32 else []) + (["bf16 screen"] if bf16 else [])
    assert all(row[f"{p} s"] > 0 for p in paths)
    assert ("kernel / no screen" in row) == (dtype == torch.float32)
    assert ("kernel / bf16 screen" in row) == bf16
    text = bench.markdown([row], "test machine")
    assert "`TopK(4) & Causal()`" in text and f"{row['screened_rows']} / 2048" in text
    if screens:
        assert f"2048 / 2048 ({screens[0]})" in text
    if dtype == torch.bfloat16:
        assert "| - |" in text  # no unscreened column for bf16
