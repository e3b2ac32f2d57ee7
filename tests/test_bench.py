"""``multihead bench``: every catalog variant and its peers, the outputs' schema, FLOP counting."""

from __future__ import annotations

import json

import time

import pytest
import torch

from multihead import catalog
from multihead.backends import BACKENDS
from multihead.backends.native import cpu_name
from multihead.bench.implementations import TORCH_DENSE, backends_used, default_peers, with_backend
from multihead.bench.measure import matmul_gflops, time_and_peak, time_interleaved
from multihead.bench.readouts import READOUTS
from multihead.bench.report import markdown
from multihead.bench.runner import TORCH_VARIANT, BenchSettings, attended_flops, pattern_density
from multihead.cli import main

TIMING_KEYS = {"median", "low", "high", "runs", "samples"}
ROW_KEYS = {"variant", "family", "implementation", "label", "length", "density", "attention_flops", "backends",
            "note", "forward_s", "forward_backward_s", "forward_peak_bytes", "forward_backward_peak_bytes",
            "forward_gflops", "forward_backward_gflops", "forward_vs_torch_dense",
            "forward_backward_vs_torch_dense"}


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """The whole catalog at N = 64 (8 x 8 for the 2-D variants) with the default peers."""
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--lengths", "64", "--dim", "16", "--heads", "2", "--repeats", "1", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "bench.json").read_text())


def test_bench_covers_every_catalog_variant(tiny_bench):
    _, result = tiny_bench
    measured = {r["variant"] for r in result["rows"] if r["implementation"] == "auto"}
    skipped = {s["variant"] for s in result["skipped"]}
    assert measured | skipped == set(catalog.CATALOG) | set(READOUTS)
    assert len(measured) >= len(catalog.CATALOG) // 2, result["skipped"]
    for s in result["skipped"]:  # only a grid that does not fit may keep a variant out
        assert s["length"] == 64 and s["reason"]


def test_bench_measures_the_readout_and_cross_modules_forward_and_backward(tiny_bench):
    _, result = tiny_bench
    auto = {r["variant"]: r for r in result["rows"] if r["implementation"] == "auto"}
    for name in READOUTS:  # their outputs are not (batch, N, dim): a gradient of their own shape
        assert auto[name]["forward_s"] and auto[name]["forward_backward_s"], auto[name]["note"]
    assert auto["kmax"]["backends"] == ["reference"]  # the cluster argmax normaliser: reference only
    assert BenchSettings(only=["readout"]).readouts() == [READOUTS["attentive_probe"], READOUTS["pointer"]]


def test_bench_schema(tiny_bench):
    out, result = tiny_bench
    assert {"machine", "versions", "settings", "matmul_ceiling", "conventions", "rows", "skipped"} <= result.keys()
    assert result["versions"]["torch"] == torch.__version__
    assert result["machine"]["cpu"] == (cpu_name() or None)  # with its family and model
    assert result["matmul_ceiling"]["gflops"] > 0
    assert TIMING_KEYS <= result["matmul_ceiling"]["timing"].keys()
    assert result["settings"]["peers"] == default_peers()
    for row in result["rows"]:
        assert ROW_KEYS <= row.keys()
        timings = [row[k] for k in ("forward_s", "forward_backward_s") if row[k] is not None]
        for t in timings:
            assert TIMING_KEYS <= t.keys() and len(t["samples"]) == t["runs"] >= 1
            assert 0 < t["low"] <= t["median"] <= t["high"]
        if not timings:  # a peer that serves neither: the note says why
            assert row["note"]
    for name in ("time_vs_length.png", "memory_vs_length.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    lines = markdown(result).splitlines()
    assert lines[2].startswith("| variant | N |") and any(line.startswith("| mha | 64 | ours (sdpa) |") for line in lines)


def test_bench_runs_the_peers_side_by_side(tiny_bench):
    _, result = tiny_bench
    rows = {(r["variant"], r["implementation"]): r for r in result["rows"]}
    dense = rows[(TORCH_VARIANT, TORCH_DENSE)]
    assert dense["forward_vs_torch_dense"] == 1.0 and dense["forward_backward_gflops"] > 0
    window = [impl for (variant, impl) in rows if variant == "sliding_window"]
    assert {"auto", "sdpa", "reference"} <= set(window)
    assert rows[("sliding_window", "auto")]["backends"] == ["blocksparse"]
    assert rows[("sliding_window", "reference")]["backends"] == ["reference"]
    # auto runs mha on SDPA: the SDPA peer would repeat it, so it is not run twice
    assert rows[("mha", "auto")]["backends"] == ["sdpa"] and ("mha", "sdpa") not in rows
    # talking heads mixes all heads' logits: SDPA cannot serve it, and the row says why
    assert rows[("talking_heads", "sdpa")]["forward_s"] is None
    assert "head_mix" in rows[("talking_heads", "sdpa")]["note"]


def test_bench_only_selects_names_and_families(tmp_path):
    settings = BenchSettings(only=["mha", "pattern"])
    names = [v.name for v in settings.variants()]
    assert "mha" in names and "sliding_window" in names and "gqa" not in names
    code = main(["bench", "--grids", "4", "--only", "mha", "--peers", "reference", "--dim", "8", "--heads", "2",
                 "--repeats", "1", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert {(r["variant"], r["implementation"], r["length"]) for r in result["rows"]} == {
        ("mha", "auto", 16), ("mha", "reference", 16)}  # no torch baseline unless among the peers
    assert all(r["forward_vs_torch_dense"] is None for r in result["rows"])


@pytest.mark.parametrize("argv, message", [
    (["--only", "nope"], "--only: unknown variants or families ['nope']"),
    (["--peers", "nope"], "--peers: unknown peers ['nope']"),
    (["--lengths", "1"], "--lengths must be integers >= 2"),
    (["--dim", "10", "--heads", "4"], "--dim (10) must be divisible by --heads (4)"),
    (["--dtype", "float7"], "unknown dtype 'float7'"),
])
def test_bench_rejects_bad_arguments(argv, message, capsys):
    assert main(["bench", *argv, "--out", "/tmp/unused"]) == 2
    assert message in capsys.readouterr().err


def test_attended_flops_scale_with_the_pattern():
    n, dim, heads = 64, 32, 4
    full = catalog.get("mha").build(dim, heads, n)
    window = catalog.get("sliding_window").build(dim, heads, n)
    assert attended_flops(full, n, batch=2) == 2 * 4 * n * n * dim  # q.k and weights.v, 2 FLOPs a MAC
    density = pattern_density(window, n)
    assert 0 < density < 1
    assert attended_flops(window, n, batch=1) == round(4 * n * n * dim * density)
    assert pattern_density(catalog.get("topk").build(dim, heads, n), n) is None  # chosen from q and k


def test_backends_used_records_and_restores():
    module = catalog.get("sliding_window").build(16, 2, 32)
    x = torch.randn(1, 32, 16)
    with backends_used() as used:
        module(x)
    assert used == {"blocksparse"}
    assert all("forward" not in vars(b) for b in BACKENDS.values())
    assert with_backend(module, "reference")
    with backends_used() as used:
        module(x)
    assert used == {"reference"}
    assert not with_backend(torch.nn.Linear(2, 2), "sdpa")


def test_time_interleaved_runs_every_function_once_per_round():
    calls = []
    timings = time_interleaved({"a": lambda: calls.append("a"), ("b", 1): lambda: calls.append("b")},
                               repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4  # one warm-up round, three timed ones, alternating
    assert {name: t.runs for name, t in timings.items()} == {"a": 3, ("b", 1): 3}
    slow = time_interleaved({"x": lambda: time.sleep(0.02)}, repeats=50, warmup=0, budget_s=0.05)
    assert 1 <= slow["x"].runs < 50  # stopped by the budget


def test_time_and_peak_counts_the_memory_run_as_a_sample():
    calls = []
    timing, peak = time_and_peak(lambda: calls.append(torch.ones(16, 1024, 1024).sum()), repeats=3)
    assert timing.runs == len(calls) == 3 and len(timing.samples) == 3
    if peak is not None:  # Linux with /proc/self/clear_refs: 64 MiB allocated
        assert 40 * 2**20 < peak < 200 * 2**20


def test_matmul_ceiling_is_positive():
    gflops, timing = matmul_gflops(128, repeats=2)
    assert gflops > 0 and timing.runs == 2


@pytest.mark.slow
def test_flex_peer_is_opt_in_and_forward_only_on_cpu(tmp_path):
    code = main(["bench", "--lengths", "128", "--only", "sliding_window", "--peers", "flex", "--dim", "32",
                 "--heads", "2", "--repeats", "1", "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    flex = next(r for r in rows if r["implementation"] == "flex")
    if flex["forward_s"] is None:
        pytest.skip(f"FlexAttention cannot run here: {flex['note']}")
    assert flex["forward_backward_s"] is None and "forward+backward" in flex["note"]
