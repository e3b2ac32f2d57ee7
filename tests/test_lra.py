"""The Long Range Arena's generated tasks: each label checked from the input alone, determinism, the
arena's handling, and a model that learns one."""

from __future__ import annotations

import pytest
import torch

from multihead.arena.lra import LRAImage, LRARetrieval, LRAText, Pathfinder, read_words
from multihead.arena.runner import ArenaSettings, make_task, run_arena, train_one
from multihead.arena.tasks import IGNORE, TASKS, Shapes
from multihead.errors import MultiheadError


def draw(task, count=64, seed=0):
    return task.generate(count, torch.Generator().manual_seed(seed))


def answers(task, tokens, targets):
    assert tokens.shape == targets.shape == (len(tokens), task.length)
    assert (tokens[:, -1] == task.index["<answer>"]).all()
    assert (targets[:, :-1] == IGNORE).all()
    return targets[:, -1]


def test_text_label_is_the_majority_of_sentiment_words():
    task = LRAText()
    tokens, targets = draw(task)
    labels = answers(task, tokens, targets)
    for row, label in zip(tokens[:, :-1], labels.tolist()):
        words = read_words(row, task.vocabulary)
        positive = sum(w in task.lexicon["positive"] for w in words)
        negative = sum(w in task.lexicon["negative"] for w in words)
        assert positive != negative and 1 <= positive + negative <= task.most
        assert label == task.index["<positive>" if positive > negative else "<negative>"]
    assert 0.3 < (labels == task.index["<positive>"]).float().mean() < 0.7
    torch.testing.assert_close(draw(task)[0], tokens)  # the seed decides everything


def test_retrieval_label_says_whether_the_two_documents_share_a_topic():
    task = LRARetrieval()
    tokens, targets = draw(task)
    labels = answers(task, tokens, targets)
    sep = task.index["<sep>"]
    for row, label in zip(tokens[:, :-1], labels.tolist()):
        cut = (row == sep).nonzero().item()
        first, second = (task.topic_of(read_words(part, task.vocabulary)) for part in (row[:cut], row[cut + 1:]))
        assert len(first) == len(second) == 1
        assert label == task.index["<same>" if first == second else "<different>"]


def test_image_is_the_quantised_shapes_row_by_row():
    task = LRAImage(size=12, levels=8)
    tokens, targets = draw(task)
    labels = answers(task, tokens, targets) - task.index["<class 0>"]
    images, want = Shapes(size=12).generate(64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(labels, want)
    levels = tokens[:, :-1] - task.index["<level 0>"]
    assert levels.min() >= 0 and levels.max() < 8
    centre = (levels.float() + 0.5) / 8 * 3 - 1  # the middle of each level's intensity bin
    inside = (images.flatten(1) > -1) & (images.flatten(1) < 2)
    assert ((centre - images.flatten(1)).abs()[inside] <= 3 / 16 + 1e-6).all()


def _joined(image, a, b):
    """Whether ink pixels a and b are 8-connected (flood fill)."""
    n = image.shape[0]
    seen, todo = {tuple(a)}, [tuple(a)]
    while todo:
        y, x = todo.pop()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                p = (y + dy, x + dx)
                if 0 <= p[0] < n and 0 <= p[1] < n and p not in seen and image[p]:
                    seen.add(p)
                    todo.append(p)
    return tuple(b) in seen


def test_pathfinder_dots_are_joined_exactly_when_one_curve_links_them():
    task = Pathfinder(dash=0)
    tokens, targets = draw(task, 200)
    labels = answers(task, tokens, targets) - task.index["<apart>"]
    walks = task.walks(200, torch.Generator().manual_seed(0))  # generate draws the walks first
    images = (tokens[:, :-1] - task.index["<background>"]).view(200, task.size, task.size).bool()
    joined = [_joined(img, w[0, 0].tolist(), w[1 - label, -1].tolist()) for img, w, label in zip(images, walks, labels)]
    joined = torch.tensor(joined)
    assert joined[labels == 1].all()  # one curve always links its two ends
    assert not joined[labels == 0].any()  # the curves keep apart
    assert 0.3 < labels.float().mean() < 0.7
    dashed = Pathfinder()
    assert (draw(dashed, 200)[0][:, :-1] == dashed.index["<ink>"]).sum() < (tokens[:, :-1] == task.index["<ink>"]).sum()


def test_arena_knows_the_lra_tasks_and_sizes_only_the_sequence_ones():
    assert {"lra_text", "lra_retrieval", "lra_image", "pathfinder", "listops"} <= set(TASKS)
    assert make_task("lra_text", 96).length == 96
    assert make_task("pathfinder", 96).length == Pathfinder().length  # set by the image size
    with pytest.raises(MultiheadError, match="length"):
        draw(LRAText(length=16))


def test_a_model_learns_the_text_task_and_the_arena_runs_a_row(tmp_path):
    torch.manual_seed(0)
    settings = ArenaSettings(tasks=["lra_text"], variants=["mha"], steps=200, seeds=1, dim=32, depth=2, heads=2,
                             train_size=1024, test_size=256)
    easy = LRAText(length=48, most=1, positive=2, negative=2, neutral=6)
    result = train_one(easy, "mha", 0, settings)
    assert result["accuracy"] > 0.9 and result["final_loss"] < 0.2
    settings.steps, settings.length = 2, 64
    report = run_arena(settings, out_dir=tmp_path)
    assert report is not None and (tmp_path / "arena.json").exists()
