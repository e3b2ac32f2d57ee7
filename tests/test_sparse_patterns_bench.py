"""The sparse-pattern benchmark's arithmetic: rates against the GEMM timed in the same rounds."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from multihead.backends import native
from multihead.patterns import Full, SlidingWindow, TopK
from multihead.request import make_request
from multihead.scores import ALiBi

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "sparse_patterns.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sparse_patterns_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _row(bench, forward, forward_backward, gemm, dense=None, dynamic=False):
    heads, dim, n = 4, 32, 1024
    # pairs whose two forward products are exactly one GEMM's multiply-adds
    pairs = bench.GEMM_SIZE ** 3 / (2 * heads * dim)
    ours = {"forward_s": min(forward), "forward_samples": forward,
            "forward_backward_s": min(forward_backward), "forward_backward_samples": forward_backward}
    return {"family": "f", "size": "s", "tokens": n, "auto": "blocksparse", "heads": heads, "head_dim": dim,
            "batch": 1, "dynamic": dynamic, "density": 0.5, "computed_pairs": pairs,
            "dense_sdpa_forward_s": min(dense or [1.0]),
            "dense_sdpa_samples": dense, "gemm_s": min(gemm), "gemm_samples": gemm, "backends": {"blocksparse": ours}}


def test_rates_are_fractions_of_the_gemm_of_the_same_round(bench):
    # forward: one GEMM of work in twice a GEMM's time; backward (2.5 GEMMs of work) in 5 GEMM times
    row = _row(bench, forward=[2.0, 4.0, 6.0], forward_backward=[7.0, 14.0, 21.0], gemm=[1.0, 2.0, 3.0],
               dense=[1.0, 2.0, 3.0])
    rates = bench.rates(row, row["backends"]["blocksparse"])
    assert rates["forward_vs_gemm"] == pytest.approx(0.5)
    assert rates["backward_vs_gemm"] == pytest.approx(0.5)
    dense_macs = 2 * 4 * 32 * 1024 ** 2 / bench.GEMM_SIZE ** 3
    assert rates["dense_vs_gemm"] == pytest.approx(dense_macs)


def test_rates_pair_rounds_and_take_the_median(bench):
    # the machine halves its speed in round two for everything: the fraction stays 0.5
    row = _row(bench, forward=[2.0, 4.0, 2.2], forward_backward=[7.0, 14.0, 7.7], gemm=[1.0, 2.0, 1.0])
    rates = bench.rates(row, row["backends"]["blocksparse"])
    assert rates["forward_vs_gemm"] == pytest.approx(0.5)
    assert rates["backward_vs_gemm"] == pytest.approx(0.5)
    row["dense_sdpa_samples"], row["dense_sdpa_forward_s"] = None, 0.5  # timed on its own: best times
    dense_macs = 2 * 4 * 32 * 1024 ** 2 / bench.GEMM_SIZE ** 3
    assert bench.rates(row, row["backends"]["blocksparse"])["dense_vs_gemm"] == pytest.approx(dense_macs * 1.0 / 0.5)


def test_rates_left_out_for_dynamic_patterns_and_missing_gemm(bench):
    row = _row(bench, forward=[2.0], forward_backward=[7.0], gemm=[1.0], dynamic=True)
    assert set(bench.rates(row, row["backends"]["blocksparse"]).values()) == {None}
    row = _row(bench, forward=[2.0], forward_backward=[7.0], gemm=[1.0])
    row.pop("gemm_samples")
    assert set(bench.rates(row, row["backends"]["blocksparse"]).values()) == {None}


def test_markdown_reports_the_rates_and_the_gemm(bench):
    row = _row(bench, forward=[0.02], forward_backward=[0.07], gemm=[0.01])
    text = bench.markdown(bench.ratios([row]), "test machine")
    assert "fwd rate / GEMM" in text and "| 50% | 50% |" in text
    assert "215 GFLOP/s" in text  # 2 x 1024^3 / 0.01 s


def test_the_passes_are_fractions_of_the_cores_limit(bench):
    # forward: 2 x 1024^3 flops in 0.02 s, backward 2.5 times that in 0.05 s: both 107 GFLOP/s
    row = _row(bench, forward=[0.02], forward_backward=[0.07], gemm=[0.01])
    limit = 2 * 2 * bench.GEMM_SIZE ** 3 / 0.02 / 1e9
    items = bench.ratios([row], limit)
    assert items[0]["forward_vs_limit"] == pytest.approx(0.5)
    assert items[0]["backward_vs_limit"] == pytest.approx(0.5)
    text = bench.markdown(items, "test machine", limit=limit)
    header, row_line = (line for line in text.splitlines() if line.startswith(("| pattern", "| f |")))
    assert header.endswith("| fwd rate / limit | bwd rate / limit |") and row_line.endswith("| 50% | 50% |")
    assert "the cores' limit, the kernel build's vector multiply-adds on registers alone: 215 GFLOP/s; the GEMM " \
           "runs at 100%-100% of it" in text
    # no limit measured (no kernel, or on a GPU), a dynamic pattern, a backward no slower than the forward
    assert bench.ratios([row])[0]["forward_vs_limit"] is None
    assert "the cores' limit" not in bench.markdown(bench.ratios([row]), "test machine")
    dynamic = _row(bench, forward=[0.02], forward_backward=[0.07], gemm=[0.01], dynamic=True)
    assert set(bench.against_limit(dynamic, dynamic["backends"]["blocksparse"], limit).values()) == {None}
    fast = _row(bench, forward=[0.02], forward_backward=[0.02], gemm=[0.01])
    assert bench.ratios([fast], limit)[0]["backward_vs_limit"] is None


@pytest.mark.skipif(native.kernel() is None, reason="the native kernel is not available")
def test_the_limit_is_measured_by_the_kernels_multiply_adds(bench):
    limit = bench.multiply_add_limit(repeats=2, steps=100_000)
    assert limit > 0 and math.isfinite(limit)


@pytest.mark.parametrize("dense_limit", [256, 128], ids=["dense_in_the_rounds", "dense_on_its_own"])
def test_one_small_case_measures_rates(bench, dense_limit):
    case = bench.Case("sliding_window_16", "256", 256, SlidingWindow(16, 16))
    row = bench.measure_case(case, heads=2, head_dim=16, repeats=1, dense_limit=dense_limit, flex_limit=0,
                             train_backends=["blocksparse"], forward_backends=["blocksparse"])
    item = bench.ratios([row])[0]
    assert row["dense_sdpa_forward_s"] > 0 and item["vs_computed_x_dense"] > 0
    # past dense_limit, dense SDPA is timed on its own: its rate from the best times
    for key in ("forward_vs_gemm", "dense_vs_gemm", "gemm_gflops"):
        assert item[key] is not None and item[key] > 0, key
    # one round of a tiny problem: its fwd+bwd may come out below its forward, then left out
    assert item["backward_vs_gemm"] is None or item["backward_vs_gemm"] > 0


def test_the_kernel_is_compared_with_the_documents_backend_where_it_serves(bench):
    row = _row(bench, forward=[2.0, 4.0], forward_backward=[7.0, 14.0], gemm=[1.0, 2.0])
    row["backends"]["documents"] = {"forward_s": 3.0, "forward_samples": [3.0, 8.0],
                                    "forward_backward_s": 14.0, "forward_backward_samples": [14.0, 28.0]}
    item = bench.ratios([row])[0]
    assert item["vs_documents"] == pytest.approx((2 / 3 + 4 / 8) / 2)  # the median of two rounds
    assert item["train_vs_documents"] == pytest.approx(0.5)
    assert "kernel / the documents backend (one SDPA call per document or cluster): forward 0.58, " \
           "forward+backward 0.50" in bench.markdown([item], "test machine")
    assert "vs_documents" not in bench.ratios([_row(bench, forward=[2.0], forward_backward=[7.0], gemm=[1.0])])[0]


def test_a_backward_no_slower_than_the_forward_is_left_out(bench):
    row = _row(bench, forward=[2.0, 2.0, 2.0], forward_backward=[1.9, 7.0, 7.0], gemm=[1.0, 1.0, 1.0])
    assert bench.rates(row, row["backends"]["blocksparse"])["backward_vs_gemm"] == pytest.approx(0.5)
    row = _row(bench, forward=[2.0], forward_backward=[1.9], gemm=[1.0])
    assert bench.rates(row, row["backends"]["blocksparse"])["backward_vs_gemm"] is None


def test_list_rows_name_each_querys_keys_in_the_flattened_keys(bench):
    batch, heads, kv_heads, q_len, kv_len, n = 2, 4, 2, 5, 7, 3
    k = torch.randn(batch, kv_heads, kv_len, 8)
    indices = torch.randint(0, kv_len, (batch, heads, q_len, n))
    rows = bench.list_rows(indices, kv_heads, kv_len)
    gathered = k.reshape(-1, 8)[rows].view(batch, heads, q_len, n, 8)
    for b, h, i, j in [(0, 0, 0, 0), (1, 3, 4, 2), (1, 2, 1, 1), (0, 1, 3, 0)]:
        assert torch.equal(gathered[b, h, i, j], k[b, h // 2, indices[b, h, i, j]])


def test_key_lists_are_compared_with_the_same_pairs_dense_and_the_embedding_bag_gather(bench):
    row = _row(bench, forward=[2.0, 4.0], forward_backward=[7.0, 14.0], gemm=[1.0, 2.0], dynamic=True)
    row["backends"]["blocksparse"].update({"lists_forward_s": 3.0, "lists_forward_samples": [3.0, 6.0]})
    row["backends"]["dense_same_pairs"] = {"lists_forward_s": 1.0, "lists_forward_samples": [1.0, 2.0]}
    row["backends"]["embedding_bag_gather"] = {"lists_forward_s": 2.0, "lists_forward_samples": [2.0, 4.0]}
    row["backends"]["lists_in_l1"] = {"lists_forward_s": 1.5, "lists_forward_samples": [1.5, 3.0]}
    row["backends"]["topk"] = {"choice_s": 0.5, "choice_samples": [0.5, 1.0]}
    item = bench.ratios([row])[0]
    assert item["lists_vs_dense_same_pairs"] == pytest.approx(3.0)
    assert item["lists_vs_gather"] == pytest.approx(1.5)
    assert item["gather_vs_dense_same_pairs"] == pytest.approx(2.0)
    assert item["lists_in_l1_vs_dense_same_pairs"] == pytest.approx(1.5)
    text = bench.markdown([item], "test machine")
    assert "key-list attention / the same pairs dense (<= 1.5): 3.00; / embedding_bag summing the same rows: " \
           "1.50, that gather itself / the same pairs dense: 2.00, the lists with every row in L1 / the same " \
           "pairs dense: 1.50" in text


def test_one_small_top_k_case_times_the_lists_and_the_embedding_bag_gather(bench):
    case = bench.Case("topk_8", "256", 256, TopK(8))
    row = bench.measure_case(case, heads=2, head_dim=16, repeats=1, dense_limit=256, flex_limit=0,
                             train_backends=["blocksparse"], forward_backends=["blocksparse"])
    item = bench.ratios([row])[0]
    for key in ("lists_vs_dense_same_pairs", "lists_vs_gather", "gather_vs_dense_same_pairs",
                "lists_in_l1_vs_dense_same_pairs", "choice_vs_dense"):
        assert item[key] is not None and item[key] > 0, key


def test_the_dense_training_peer_is_timed_and_reported(bench):
    peer = bench.peer_training(64, heads=2, head_dim=16, repeats=2)
    assert peer["tokens"] == 64 and peer["forward_s"] > 0 and peer["forward_backward_s"] > 0
    assert peer["train_over_forward"] > 0
    row = _row(bench, forward=[0.02], forward_backward=[0.07], gemm=[0.01])
    text = bench.markdown(bench.ratios([row]), "test machine",
                          {"tokens": 2048, "forward_s": 0.05, "forward_backward_s": 0.18, "train_over_forward": 3.6})
    assert "PyTorch's fused attention (dense SDPA, 2048 tokens, no mask) fwd+bwd / fwd: 3.60" in text
    assert "PyTorch's fused attention" not in bench.markdown(bench.ratios([row]), "test machine")


def test_a_quick_run_writes_the_peer_beside_the_table(bench, tmp_path):
    assert bench.main(["--quick", "--only", "sliding_window", "--repeats", "1", "--peer-tokens", "128",
                       "--out", str(tmp_path)]) == 0
    assert "dense SDPA, 128 tokens" in (tmp_path / "sparse_patterns.md").read_text()
    written = json.loads((tmp_path / "sparse_patterns.json").read_text())
    assert (written["multiply_add_limit_gflops"] is None) == (native.kernel() is None)


def test_lists_in_l1_name_the_first_keys_in_the_lists_shape(bench):
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 9, 4)
    lists = make_request(q, k, k, pattern=TopK(3)).pattern
    first = bench.lists_in_l1(lists)
    assert first.indices.shape == lists.indices.shape and first.kv_len == 9 and bool(first.valid.all())
    assert first.indices[0, 1, 4].tolist() == [0, 1, 2]


def test_a_case_with_a_score_runs_it_on_every_backend_but_the_dense_yardstick(bench, monkeypatch):
    """A case's score (built for the run's heads) reaches every call the case times, the kernel's,
    its PyTorch tiles', bf16 and training; the dense SDPA yardstick runs without it."""
    calls = []
    attention = bench.mh.attention

    def spy(*args, pattern=None, score=None, **kwargs):
        calls.append((pattern, score))
        return attention(*args, pattern=pattern, score=score, **kwargs)

    monkeypatch.setattr(bench.mh, "attention", spy)
    case = bench.Case("scored_window_16", "256", 256, SlidingWindow(16, 16), ALiBi)
    bench.measure_case(case, heads=2, head_dim=16, repeats=1, dense_limit=256, flex_limit=0,
                       train_backends=["blocksparse"], forward_backends=["blocksparse"])
    scored = [score for pattern, score in calls if pattern == case.pattern]
    assert scored and all(isinstance(score, ALiBi) and score.num_heads == 2 for score in scored)
    assert all(score is None for pattern, score in calls if isinstance(pattern, Full))
    assert any(isinstance(pattern, Full) for pattern, _ in calls)
