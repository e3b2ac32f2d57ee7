"""``multihead arena``: the generated tasks, the outputs' schema, determinism, the MQAR ordering."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from multihead import catalog
from multihead.arena import ArenaSettings, run_arena
from multihead.arena.report import markdown
from multihead.arena.runner import check_causal
from multihead.arena.tasks import IGNORE, MQAR, ListOps, SelectiveCopy, Shapes, _LISTOPS_VOCAB
from multihead.cli import main
from multihead.errors import MultiheadError
from multihead.models import TransformerLM


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_mqar_queries_ask_for_the_values_given_earlier():
    task = MQAR(length=64, pairs=8, keys=32, values=32)
    tokens, targets = task.generate(20, _gen())
    assert tokens.shape == targets.shape == (20, 64) and int(tokens.max()) < task.vocab
    for seq, target in zip(tokens.tolist(), targets.tolist()):
        given = dict(zip(seq[0:16:2], seq[1:16:2]))
        assert len(given) == 8 and all(1 <= k <= 32 < v for k, v in given.items())
        asked = [i for i, t in enumerate(target) if t != IGNORE]
        assert len(asked) == 8 and min(asked) >= 32  # at least 32 - 16 tokens after the keys
        assert sorted(seq[i] for i in asked) == sorted(given)
        assert all(target[i] == given[seq[i]] for i in asked)
        assert all(t == 0 for i, t in enumerate(seq[16:], 16) if i not in asked)  # no value is repeated


def test_selective_copy_targets_are_the_data_tokens_in_order():
    task = SelectiveCopy(length=32, tokens=6, colors=5)
    tokens, targets = task.generate(10, _gen())
    for seq, target in zip(tokens.tolist(), targets.tolist()):
        data = [t for t in seq[:26] if t >= 2]
        assert len(data) == 6 and seq[26:] == [1] * 6 and target[26:] == data
        assert set(target[:26]) == {IGNORE}


def _evaluate(tokens: list[str]) -> int:
    """An independent ListOps evaluator (a stack machine over the token string)."""
    stack = []
    for token in tokens:
        if token.startswith("["):
            stack.append([token])
        elif token == "]":
            op, *values = stack.pop()
            result = {"[MIN": min(values), "[MAX": max(values), "[SM": sum(values) % 10,
                      "[MED": int(statistics.median(values))}[op]
            if not stack:
                return result
            stack[-1].append(result)
        elif stack:
            stack[-1].append(int(token))
        else:
            return int(token)
    raise AssertionError("unbalanced")


@pytest.mark.parametrize("length, min_length", [(64, 8), (2048, 500)])
def test_listops_answers_are_the_expressions_values(length, min_length):
    task = ListOps(length=length, min_length=min_length)
    tokens, targets = task.generate(8, _gen())
    for seq, target in zip(tokens.tolist(), targets.tolist()):
        words = [_LISTOPS_VOCAB[t] for t in seq if t != 0]
        assert words[-1] == "<answer>" and min_length <= len(words) - 1 <= length - 1
        assert _LISTOPS_VOCAB[target[-1]] == str(_evaluate(words[:-1]))
        assert set(target[:-1]) == {IGNORE}


def test_tasks_are_drawn_from_the_seed():
    for task in (MQAR(), SelectiveCopy(), ListOps(length=64, min_length=8), Shapes()):
        a, b, c = task.generate(4, _gen(1)), task.generate(4, _gen(1)), task.generate(4, _gen(2))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not torch.equal(a[0], c[0])


def test_shapes_are_images_with_labels():
    images, labels = Shapes(size=16).generate(64, _gen())
    assert images.shape == (64, 1, 16, 16) and labels.min() >= 0 and labels.max() < Shapes.classes
    assert len(labels.unique()) > 4


TINY = dict(steps=4, seeds=2, batch=8, dim=16, depth=1, heads=2, length=32, train_size=64, test_size=32)


def test_arena_schema_and_every_variant_appears(tmp_path):
    """Every catalog variant is either trained or listed as skipped with the reason."""
    settings = ArenaSettings(tasks=["mqar"], variants=list(catalog.CATALOG), **{**TINY, "seeds": 1, "steps": 1})
    result = run_arena(settings, tmp_path)
    saved = json.loads((tmp_path / "arena.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp_path / "arena.png").read_bytes()[:4] == b"\x89PNG"
    trained = {r["variant"] for r in result["rows"]}
    skipped = {s["variant"]: s["reason"] for s in result["skipped"]}
    assert trained | set(skipped) == set(catalog.CATALOG) and not trained & set(skipped)
    assert "not causal" in skipped["single_head"]
    assert "| mqar | mha | 1 |" in markdown(result) and "single_head: MultiheadError: not causal" in markdown(result)
    for row in result["rows"]:
        assert {"task", "variant", "chance", "task_settings", "accuracy_mean", "accuracy_std", "accuracy_min",
                "accuracy_max", "train_s_mean", "peak_bytes_max", "parameters", "runs"} <= row.keys()
        assert 0 <= row["accuracy_min"] <= row["accuracy_mean"] <= row["accuracy_max"] <= 1
        assert row["task_settings"]["length"] == 32


def test_arena_is_deterministic(tmp_path, capsys):
    argv = ["arena", "--task", "mqar,selective_copy", "--variants", "full,sliding_window", "--steps", "3",
            "--seeds", "2", "--batch", "8", "--dim", "16", "--depth", "1", "--heads", "2", "--length", "32"]
    runs = []
    for i in range(2):
        assert main([*argv, "--out", str(tmp_path / str(i))]) == 0
        rows = json.loads((tmp_path / str(i) / "arena.json").read_text())["rows"]
        runs.append([(r["task"], r["variant"], [run["accuracy"] for run in r["runs"]]) for r in rows])
    assert runs[0] == runs[1] and len(runs[0]) == 4
    assert [(t, v) for t, v, _ in runs[0]] == [("mqar", "mha"), ("mqar", "sliding_window"),
                                              ("selective_copy", "mha"), ("selective_copy", "sliding_window")]
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--task", "nope"], "--task: unknown tasks ['nope']"),
    (["--variants", "nope"], "--variants: unknown ['nope']"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_arena_rejects_bad_arguments(argv, message, capsys):
    assert main(["arena", *argv, "--out", "/tmp/unused"]) == 2
    assert message in capsys.readouterr().err


def test_check_causal_refuses_a_model_that_sees_the_future():
    task = MQAR(length=32, pairs=4)
    check_causal(TransformerLM(task.vocab, 16, 1, 2, max_len=32), task)
    with pytest.raises(MultiheadError, match="not causal"):
        check_causal(TransformerLM(task.vocab, 16, 1, 2, max_len=32, causal=False), task)


def test_image_task_runs_through_the_vision_transformer(tmp_path):
    result = run_arena(ArenaSettings(tasks=["image"], variants=["full", "swin_block"],
                                     **{**TINY, "length": None, "steps": 2}), tmp_path)
    assert [r["variant"] for r in result["rows"]] == ["mha", "swin_block"]
    for row in result["rows"]:
        assert row["task_settings"]["data"] in ("Shapes", "Digits") and 0 <= row["accuracy_mean"] <= 1
        assert len(row["runs"]) == TINY["seeds"]


@pytest.mark.slow
def test_mqar_full_attention_recalls_and_a_short_window_does_not(tmp_path):
    """The keys sit in the first 8 tokens, the queries in the second half of 64: the sliding
    window (16 keys each side at 64 tokens) cannot reach them and stays at chance (1/16); full
    attention learns to recall (two thirds right after 1500 steps here, well above chance at the
    task's 1000)."""
    settings = ArenaSettings(tasks=["mqar"], variants=["full", "sliding_window"], seeds=1)
    rows = {r["variant"]: r for r in run_arena(settings, tmp_path)["rows"]}
    assert rows["mha"]["accuracy_mean"] > 4 * rows["mha"]["chance"]
    assert rows["sliding_window"]["accuracy_mean"] < 2 * rows["sliding_window"]["chance"]


def test_block_transformer_reads_its_own_position_and_nothing_later():
    from multihead.arena.models import ReadsThrough
    from multihead.models.block_lm import BlockTransformerLM

    torch.manual_seed(0)
    inner = BlockTransformerLM(12, 16, 2, block=4, max_len=16)
    model = ReadsThrough(inner, 4)
    tokens = torch.randint(0, 12, (1, 10))
    padded = torch.cat([tokens, torch.zeros(1, 2, dtype=torch.long)], 1)  # 10 + 1, up to a multiple of 4
    torch.testing.assert_close(model(tokens), inner(padded)[:, 1:11])
    changed = tokens.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 12
    moved = (model(changed) - model(tokens)).abs().amax(-1)[0]
    assert moved[:5].max() == 0 and moved[5] > 0  # position 5 reads token 5, earlier ones do not


def test_arena_trains_the_models_beside_the_variants(tmp_path):
    settings = ArenaSettings(tasks=["mqar", "image"], variants=["full", "block_transformer", "wide_attention"],
                             steps=3, seeds=1, train_size=64, test_size=32, dim=16, heads=2)
    result = run_arena(settings, out_dir=tmp_path)
    trained = {(r["task"], r["variant"]) for r in result["rows"]}
    assert {("mqar", "block_transformer"), ("mqar", "wide_attention"), ("image", "mha")} <= trained
    assert {s["variant"] for s in result["skipped"]} == {"block_transformer", "wide_attention"}
    wide = next(r for r in result["rows"] if r["variant"] == "wide_attention")
    deep = next(r for r in result["rows"] if r["variant"] == "mha" and r["task"] == "mqar")
    assert wide["parameters"] < deep["parameters"]  # same heads, one MLP instead of two
    with pytest.raises(MultiheadError, match="block_transformer"):
        ArenaSettings(variants=["block_transformerz"]).validate()
