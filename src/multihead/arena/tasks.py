"""The arena's tasks, generated from a seed (nothing is downloaded).

Sequence tasks give ``(tokens, targets)``, both ``(count, length)`` integer tensors, with
``IGNORE`` in ``targets`` wherever nothing is asked: a causal language model is scored only at the
positions that have a target. The image task gives ``(images, labels)``.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import MultiheadError

IGNORE = -100


class Task:
    """A generated task: ``generate(count, gen)`` draws examples; ``datasets`` gives a training and
    a held-out test set from one seed; ``steps`` is the arena's default training length for it."""

    steps = 300

    def generate(self, count: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def datasets(self, train: int, test: int, seed: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        return self.generate(train, gen), self.generate(test, gen)


@dataclass(frozen=True)
class MQAR(Task):
    """Multi-query associative recall (Arora et al., 2023, "Zoology", arXiv 2312.04927).

    The sequence opens with ``pairs`` key-value pairs ``k1 v1 k2 v2 ...``; in its second half every
    key is asked again, once, at a random position; the target at each query is the key's value, so
    a model must look back from the query to where the key was given: at least
    ``length / 2 - 2 * pairs`` tokens. Unlike Zoology, a query is not followed by its value in the
    input: a model could otherwise score by eliminating the values already asked (half the queries
    right with 4 pairs) without recalling anything. Keys are tokens ``1 .. keys``, values the
    ``values`` tokens after them, ``0`` fills the rest.
    """

    length: int = 64
    pairs: int = 4
    keys: int = 16
    values: int = 16

    name = "mqar"
    # Recall is learnt late: full attention (dim 64, 2 blocks) got about a third of the queries right
    # after 600 steps and two thirds after 1500, in single runs on this machine.
    steps = 1000

    @property
    def vocab(self) -> int:
        return 1 + self.keys + self.values

    @property
    def chance(self) -> float:
        return 1 / self.values

    def check(self) -> None:
        if self.pairs > self.keys:
            raise MultiheadError(f"MQAR needs pairs ({self.pairs}) <= keys ({self.keys})")
        if self.length < 4 * self.pairs:
            raise MultiheadError(f"MQAR length {self.length} is too short for {self.pairs} pairs: use "
                                 f"length >= {4 * self.pairs}")

    def generate(self, count: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        self.check()
        keys = torch.rand(count, self.keys, generator=gen).argsort(-1)[:, :self.pairs] + 1
        values = torch.randint(1 + self.keys, self.vocab, (count, self.pairs), generator=gen)
        tokens = torch.zeros(count, self.length, dtype=torch.long)
        targets = torch.full_like(tokens, IGNORE)
        tokens[:, 0:2 * self.pairs:2], tokens[:, 1:2 * self.pairs:2] = keys, values
        # queries: the keys in a random order, at random positions of the second half
        half = self.length // 2
        positions = half + torch.rand(count, self.length - half, generator=gen).argsort(-1)[:, :self.pairs]
        order = torch.rand(count, self.pairs, generator=gen).argsort(-1)
        rows = torch.arange(count).unsqueeze(1)
        tokens[rows, positions] = keys.gather(1, order)
        targets[rows, positions] = values.gather(1, order)
        return tokens, targets


@dataclass(frozen=True)
class SelectiveCopy(Task):
    """Selective copying (Gu and Dao, 2023, "Mamba", arXiv 2312.00752, section 3.1).

    ``tokens`` data tokens sit at random positions among noise (token 0) in the first
    ``length - tokens`` positions; ``tokens`` marker tokens (1) close the sequence, and the target at
    the ``i``-th marker is the ``i``-th data token. Data tokens are ``2 .. 2 + colors``.
    """

    length: int = 64
    tokens: int = 8
    colors: int = 8

    name = "selective_copy"

    @property
    def vocab(self) -> int:
        return 2 + self.colors

    @property
    def chance(self) -> float:
        return 1 / self.colors

    def generate(self, count: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        span = self.length - self.tokens
        if span < self.tokens:
            raise MultiheadError(f"selective copying needs length >= 2 x tokens, got length {self.length} "
                                 f"for {self.tokens} tokens")
        data = torch.randint(2, self.vocab, (count, self.tokens), generator=gen)
        where = torch.rand(count, span, generator=gen).argsort(-1)[:, :self.tokens].sort(-1).values
        tokens = torch.zeros(count, self.length, dtype=torch.long)
        rows = torch.arange(count).unsqueeze(1)
        tokens[rows, where] = data
        tokens[:, span:] = 1
        targets = torch.full_like(tokens, IGNORE)
        targets[:, span:] = data
        return tokens, targets


# -- ListOps ----------------------------------------------------------------------------------------

_OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
_LISTOPS_VOCAB = ["<pad>", "<answer>", *map(str, range(10)), *_OPERATORS, "]"]
_LISTOPS_INDEX = {token: i for i, token in enumerate(_LISTOPS_VOCAB)}


class _TooLong(Exception):
    """A ListOps tree grew past the longest length asked for: it will be rejected, stop drawing it."""


def _listops_tree(rng: random.Random, depth: int, max_depth: int, max_args: int, value_p: float,
                  budget: list[int]):
    """The Long Range Arena generator's grammar (Tay et al., 2020, arXiv 2011.04006): below
    ``max_depth`` a node is an operator with 2 to ``max_args`` arguments with probability
    ``value_p``, otherwise a digit. ``budget`` holds the tokens left; drawing stops with
    ``_TooLong`` once they run out (the tree would be rejected for its length anyway)."""
    operator = depth < max_depth and rng.random() <= value_p
    budget[0] -= 2 if operator else 1
    if budget[0] < 0:
        raise _TooLong
    if operator:
        children = [_listops_tree(rng, depth + 1, max_depth, max_args, value_p, budget)
                    for _ in range(rng.randint(2, max_args))]
        return (rng.choice(_OPERATORS), children)
    return rng.randrange(10)


def _listops_value(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, children = tree
    values = [_listops_value(c) for c in children]
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(statistics.median(values))
    return sum(values) % 10


def _listops_tokens(tree) -> list[str]:
    if isinstance(tree, int):
        return [str(tree)]
    op, children = tree
    return [op, *(t for c in children for t in _listops_tokens(c)), "]"]


@dataclass(frozen=True)
class ListOps(Task):
    """ListOps as in the Long Range Arena (Tay et al., 2020): nested ``MIN``, ``MAX``, ``MED``
    (median, rounded down) and ``SM`` (sum modulo 10) over digits, e.g. ``[MAX 4 [MIN 2 3 ] 1 ]``
    -> 4; ten classes. The LRA's grammar and operators (``max_depth`` 10, ``max_args`` 10,
    ``value_p`` 0.25, lengths 500 to 2000 there; shorter here by default), without its redundant
    parentheses. Expressions are left-padded to ``length - 1`` tokens and followed by an answer
    token whose target is the result."""

    length: int = 128
    min_length: int = 16
    max_depth: int = 10
    max_args: int = 10
    value_p: float = 0.25

    name = "listops"
    vocab = len(_LISTOPS_VOCAB)
    chance = 0.1

    def generate(self, count: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if not 2 <= self.min_length < self.length:
            raise MultiheadError(f"ListOps needs 2 <= min_length < length, got {self.min_length}, {self.length}")
        rng = random.Random(int(torch.randint(2**62, (1,), generator=gen)))
        tokens = torch.zeros(count, self.length, dtype=torch.long)
        targets = torch.full_like(tokens, IGNORE)
        made = 0
        while made < count:
            try:
                tree = _listops_tree(rng, 1, self.max_depth, self.max_args, self.value_p, [self.length - 1])
            except _TooLong:
                continue
            expression = _listops_tokens(tree)
            if not self.min_length <= len(expression) <= self.length - 1:
                continue
            ids = [_LISTOPS_INDEX[t] for t in expression] + [_LISTOPS_INDEX["<answer>"]]
            tokens[made, self.length - len(ids):] = torch.tensor(ids)
            targets[made, -1] = _LISTOPS_INDEX[str(_listops_value(tree))]
            made += 1
        return tokens, targets


# -- images -----------------------------------------------------------------------------------------

_SHAPES = ("horizontal bar", "vertical bar", "diagonal", "anti-diagonal", "square", "cross", "disk", "ring")


@dataclass(frozen=True)
class Shapes(Task):
    """A generated image task: eight shapes (bars, diagonals, square outline, cross, disk, ring) of
    random size and position on a noisy grey ``size x size`` image; the label is the shape. Used by
    the image task when scikit-learn's digits are not installed."""

    size: int = 16
    noise: float = 0.3

    classes = len(_SHAPES)

    def generate(self, count: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n = self.size
        labels = torch.randint(0, self.classes, (count,), generator=gen)
        radius = torch.randint(n // 5, n // 3 + 1, (count, 1, 1), generator=gen).float()
        per_axis = radius.unsqueeze(1)  # (count, 1, 1, 1), against the (count, 2, 1, 1) centres
        centre = per_axis + torch.rand(count, 2, 1, 1, generator=gen) * (n - 1 - 2 * per_axis)
        ys, xs = torch.meshgrid(torch.arange(n).float(), torch.arange(n).float(), indexing="ij")
        dy, dx = ys - centre[:, 0], xs - centre[:, 1]
        inside = (dy.abs() <= radius) & (dx.abs() <= radius)
        distance = (dy**2 + dx**2).sqrt()
        masks = torch.stack([
            inside & (dy.abs() <= 1), inside & (dx.abs() <= 1), inside & ((dy - dx).abs() <= 1),
            inside & ((dy + dx).abs() <= 1),
            inside & (((dy.abs() - radius).abs() <= 0.5) | ((dx.abs() - radius).abs() <= 0.5)),
            inside & ((dy.abs() <= 1) | (dx.abs() <= 1)), distance <= radius, (distance - radius).abs() <= 0.8,
        ], dim=1)
        images = masks[torch.arange(count), labels].float()
        images = images + self.noise * torch.randn(count, n, n, generator=gen)
        return images.unsqueeze(1), labels


@dataclass(frozen=True)
class Digits(Task):
    """scikit-learn's 8 x 8 handwritten digits (1797 images, ten classes), scaled to ``[0, 1]``,
    shuffled by the seed and split into disjoint training and test images. Only where scikit-learn
    is installed (it ships the data)."""

    size = 8
    classes = 10

    def datasets(self, train: int, test: int, seed: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        from sklearn.datasets import load_digits

        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
        labels = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        held_out = min(test, len(labels) // 4)
        test_idx, train_idx = order[:held_out], order[held_out:][:train]
        return (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])


def image_source() -> Shapes | Digits:
    """scikit-learn's digits where installed, else the generated shapes."""
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return Shapes()
    return Digits()


@dataclass(frozen=True)
class Image(Task):
    """Image classification through ``multihead.models.VisionTransformer`` (patches of ``patch``
    pixels), on ``image_source()``'s data."""

    patch: int = 2

    name = "image"

    @property
    def source(self) -> Shapes | Digits:
        return image_source()

    @property
    def chance(self) -> float:
        return 1 / self.source.classes

    def datasets(self, train: int, test: int, seed: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        return self.source.datasets(train, test, seed)


from .lra import LRA_TASKS  # noqa: E402  (the Long Range Arena's other tasks build on Shapes and Task above)

TASKS = {"mqar": MQAR, "listops": ListOps, "selective_copy": SelectiveCopy, "image": Image, **LRA_TASKS}
