"""The Long Range Arena's tasks besides ListOps (Tay et al., 2020, "Long Range Arena: A Benchmark for
Efficient Transformers", arXiv 2011.04006), generated from a seed instead of downloaded.

Every task is a sequence classification answered at a final ``<answer>`` token, as ``ListOps``: the
input is left-padded to ``length - 1`` tokens, the target at the last position is the class's token
and every other target is ``IGNORE``, so a causal ``TransformerLM`` reads the whole input first.

- ``lra_text``: byte-level sentiment (LRA: IMDb reviews, characters as tokens). Documents are words of
  a generated lexicon spelled letter by letter; the label says whether more positive than negative
  words occur. A model must build words from characters and count them over the whole document.
- ``lra_retrieval``: document matching (LRA: ACL Anthology citation links). Two byte-level documents
  separated by ``<sep>``; each carries keywords of one topic among neutral words; the label says
  whether the topics agree. LRA encodes the two documents separately (a two-tower model); here they
  share one sequence, which a ``TransformerLM`` can take.
- ``lra_image``: an image as a sequence of pixel intensities (LRA: CIFAR-10 in grey, 256 levels,
  32 x 32); here the arena's generated shapes, quantised to ``levels``, ``size x size``.
- ``pathfinder``: are the two dots joined by one dashed path (LRA: 32 x 32, Linsley et al., 2018)?
  Two smooth random curves; a positive marks both ends of one curve, a negative one end of each.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from ..errors import MultiheadError
from .tasks import IGNORE, Shapes, Task

_SPECIAL = ("<pad>", "<answer>")


def _vocabulary(classes: tuple[str, ...], content: tuple[str, ...]) -> dict[str, int]:
    return {token: i for i, token in enumerate((*_SPECIAL, *classes, *content))}


def _answered(rows: list[list[int]], labels: list[int], length: int, index: dict[str, int],
              classes: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """Left-pad each row to ``length - 1`` tokens, append ``<answer>``, target the class token."""
    tokens = torch.full((len(rows), length), index["<pad>"], dtype=torch.long)
    targets = torch.full_like(tokens, IGNORE)
    for i, (row, label) in enumerate(zip(rows, labels)):
        if len(row) > length - 1:
            raise MultiheadError(f"a generated input of {len(row)} tokens does not fit length={length}")
        ids = row + [index["<answer>"]]
        tokens[i, length - len(ids):] = torch.tensor(ids)
        targets[i, -1] = index[classes[label]]
    return tokens, targets


def make_lexicon(count: int, seed: int = 0, shortest: int = 3, longest: int = 6) -> list[str]:
    """``count`` distinct lowercase words of ``shortest..longest`` letters (a fixed language per seed)."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < count:
        words["".join(rng.choices(string.ascii_lowercase, k=rng.randint(shortest, longest)))] = None
    return list(words)


def _spell(words: list[str], index: dict[str, int]) -> list[int]:
    return [index[c] for c in " ".join(words)]


def read_words(tokens: Tensor, vocabulary: list[str]) -> list[str]:
    """The words spelled by a row of byte tokens (spaces and special tokens separate them)."""
    text = "".join(vocabulary[t] if len(vocabulary[t]) == 1 else " " for t in tokens.tolist())
    return text.split()


class _Bytes(Task):
    """Shared by the byte-level tasks: letters and space as tokens, a fixed lexicon."""

    chance = 0.5
    classes = ("<no>", "<yes>")
    extra: tuple[str, ...] = ()

    @cached_property
    def index(self) -> dict[str, int]:
        return _vocabulary(self.classes, (*self.extra, " ", *string.ascii_lowercase))

    @property
    def vocabulary(self) -> list[str]:
        return list(self.index)

    @property
    def vocab(self) -> int:
        return len(self.index)

    def _filled(self, rng: random.Random, marked: list[str], neutral: list[str], budget: int) -> list[str]:
        """``marked`` words at random places among neutral words, ``budget`` characters at most."""
        words = list(marked)
        while len(" ".join(words)) + 7 <= budget:
            words.append(rng.choice(neutral))
        rng.shuffle(words)
        return words


@dataclass(frozen=True)
class LRAText(_Bytes):
    """Byte-level sentiment (module docstring): ``positive`` and ``negative`` words of the lexicon, 1 to
    ``most`` of them in a document (never as many of each), the rest neutral; label: more positive."""

    length: int = 256
    positive: int = 6
    negative: int = 6
    neutral: int = 40
    most: int = 5

    name = "lra_text"
    classes = ("<negative>", "<positive>")

    @cached_property
    def lexicon(self) -> dict[str, list[str]]:
        words = make_lexicon(self.positive + self.negative + self.neutral)
        return {"positive": words[:self.positive], "negative": words[self.positive:self.positive + self.negative],
                "neutral": words[self.positive + self.negative:]}

    def generate(self, count: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.length < 8 * self.most + 8:
            raise MultiheadError(f"lra_text needs length >= {8 * self.most + 8} for {self.most} sentiment words")
        rng = random.Random(int(torch.randint(2**62, (1,), generator=gen)))
        lexicon, rows, labels = self.lexicon, [], []
        for _ in range(count):
            label = rng.randint(0, 1)
            total = rng.randint(1, self.most)
            majority = rng.randint(total // 2 + 1, total)
            pos, neg = (majority, total - majority) if label else (total - majority, majority)
            marked = rng.choices(lexicon["positive"], k=pos) + rng.choices(lexicon["negative"], k=neg)
            rows.append(_spell(self._filled(rng, marked, lexicon["neutral"], self.length - 1), self.index))
            labels.append(label)
        return _answered(rows, labels, self.length, self.index, self.classes)


@dataclass(frozen=True)
class LRARetrieval(_Bytes):
    """Document matching (module docstring): ``topics`` topics of ``keywords`` words each; a document
    holds ``per_document`` keywords of its topic among neutral words; half the pairs share a topic."""

    length: int = 256
    topics: int = 6
    keywords: int = 3
    per_document: int = 2
    neutral: int = 40

    name = "lra_retrieval"
    classes = ("<different>", "<same>")
    extra = ("<sep>",)

    @cached_property
    def lexicon(self) -> dict[str, list]:
        words = make_lexicon(self.topics * self.keywords + self.neutral, seed=1)
        k = self.keywords
        return {"topics": [words[t * k:(t + 1) * k] for t in range(self.topics)],
                "neutral": words[self.topics * k:]}

    def topic_of(self, words: list[str]) -> set[int]:
        """The topics whose keywords occur in ``words``."""
        return {t for t, keys in enumerate(self.lexicon["topics"]) if any(w in keys for w in words)}

    def generate(self, count: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        half = (self.length - 2) // 2
        if half < 8 * self.per_document + 8 or self.topics < 2:
            raise MultiheadError(f"lra_retrieval needs topics >= 2 and length >= {2 * (8 * self.per_document + 8) + 2}")
        rng = random.Random(int(torch.randint(2**62, (1,), generator=gen)))
        lexicon, rows, labels = self.lexicon, [], []
        for _ in range(count):
            label = rng.randint(0, 1)
            first = rng.randrange(self.topics)
            second = first if label else rng.choice([t for t in range(self.topics) if t != first])
            docs = [_spell(self._filled(rng, rng.choices(lexicon["topics"][t], k=self.per_document),
                                        lexicon["neutral"], half), self.index) for t in (first, second)]
            rows.append(docs[0] + [self.index["<sep>"]] + docs[1])
            labels.append(label)
        return _answered(rows, labels, self.length, self.index, self.classes)


@dataclass(frozen=True)
class LRAImage(Task):
    """Pixels as tokens (module docstring): the generated shapes (``Shapes``, 8 classes) at
    ``size x size``, intensities clipped to ``[-1, 2)`` and quantised to ``levels`` tokens."""

    size: int = 16
    levels: int = 16

    name = "lra_image"

    @property
    def source(self) -> Shapes:
        return Shapes(size=self.size)

    @property
    def length(self) -> int:
        return self.size * self.size + 1

    @property
    def chance(self) -> float:
        return 1 / self.source.classes

    @cached_property
    def index(self) -> dict[str, int]:
        classes = tuple(f"<class {c}>" for c in range(Shapes.classes))
        return _vocabulary(classes, tuple(f"<level {i}>" for i in range(self.levels)))

    @property
    def vocab(self) -> int:
        return len(self.index)

    def quantise(self, images: Tensor) -> Tensor:
        """``(count, 1, size, size)`` intensities -> level indices ``(count, size * size)``."""
        scaled = ((images.flatten(1) + 1) / 3).clamp(0, 1 - 1e-6)
        return (scaled * self.levels).long()

    def generate(self, count: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.size < 6 or self.levels < 2:
            raise MultiheadError(f"lra_image needs size >= 6 and levels >= 2, got {self.size}, {self.levels}")
        images, labels = self.source.generate(count, gen)
        first = self.index["<level 0>"]
        tokens = torch.cat([self.quantise(images) + first, torch.full((count, 1), self.index["<answer>"])], 1)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = labels + self.index["<class 0>"]
        return tokens, targets


@dataclass(frozen=True)
class Pathfinder(Task):
    """Two dots, joined by one dashed curve or not (module docstring). Each of the ``curves`` curves
    (kept apart: none touches another, so only a curve joins dots) is
    a smooth random walk of ``path_length`` unit steps (heading turned by ``N(0, turn)`` radians per step,
    reflected at the border), drawn ``dash`` pixels on, one off; dots are 3 x 3 squares. Tokens: 0
    background, 1 ink; ``dash=0`` draws the curves solid."""

    size: int = 16
    path_length: int = 12
    curves: int = 2
    turn: float = 0.3
    dash: int = 2

    name = "pathfinder"
    chance = 0.5
    classes = ("<apart>", "<joined>")

    @property
    def length(self) -> int:
        return self.size * self.size + 1

    @cached_property
    def index(self) -> dict[str, int]:
        return _vocabulary(self.classes, ("<background>", "<ink>"))

    @property
    def vocab(self) -> int:
        return len(self.index)

    def walks(self, count: int, gen: torch.Generator) -> Tensor:
        """Pixel coordinates ``(count, curves, path_length + 1, 2)`` of curves that keep apart: no pixel
        of one curve or of the dots at its ends touches (8-neighbourhood) another curve. Drawn in
        rounds, rejecting the examples whose curves touch, until ``count`` are kept."""
        kept, have = [], 0
        for _ in range(1000):
            walks = self._random_walks(2 * (count - have) + 8, gen)
            apart = walks[self._apart(walks)][:count - have]
            kept.append(apart)
            have += len(apart)
            if have == count:
                return torch.cat(kept)
        raise MultiheadError(f"pathfinder: curves of {self.path_length} steps on {self.size} x {self.size} almost "
                             f"always touch; use a larger size or shorter curves")

    def _apart(self, walks: Tensor) -> Tensor:
        """``(count,)``: whether no curve (dots at both ends included) touches another."""
        count, n = walks.shape[0], self.size
        masks = torch.zeros(count, self.curves, n, n)
        index = torch.arange(count).view(-1, 1, 1), torch.arange(self.curves).view(1, -1, 1)
        masks[index[0], index[1], walks[..., 0], walks[..., 1]] = 1
        ends = walks[:, :, [0, -1]]
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                masks[index[0], index[1], (ends[..., 0] + dy).clamp(0, n - 1), (ends[..., 1] + dx).clamp(0, n - 1)] = 1
        grown = torch.nn.functional.max_pool2d(masks, 3, stride=1, padding=1)
        touching = torch.zeros(count, dtype=torch.bool)
        for i in range(self.curves):
            for j in range(i + 1, self.curves):
                touching |= (grown[:, i] * masks[:, j]).flatten(1).any(1)
        return ~touching

    def _random_walks(self, count: int, gen: torch.Generator) -> Tensor:
        """Smooth random walks ``(count, curves, path_length + 1, 2)`` in pixels (8-connected: a unit
        step moves a rounded coordinate by at most 1)."""
        n, shape = self.size, (count, self.curves)
        low, high = 1.0, n - 2.0
        position = low + torch.rand(*shape, 2, generator=gen) * (high - low)
        heading = torch.rand(*shape, generator=gen) * 2 * math.pi
        points = [position]
        for _ in range(self.path_length):
            heading = heading + self.turn * torch.randn(*shape, generator=gen)
            direction = torch.stack([heading.sin(), heading.cos()], -1)
            step = position + direction
            outside = (step < low) | (step > high)
            direction = torch.where(outside, -direction, direction)  # reflect at the border
            heading = torch.atan2(direction[..., 0], direction[..., 1])
            position = (position + direction).clamp(low, high)
            points.append(position)
        return torch.floor(torch.stack(points, 2) + 0.5).long()

    def generate(self, count: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.size < 8 or self.path_length < 2 or self.curves < 2 or self.dash < 0:
            raise MultiheadError("pathfinder needs size >= 8, path_length >= 2, curves >= 2 and dash >= 0, got "
                                 f"{self.size}, {self.path_length}, {self.curves}, {self.dash}")
        n = self.size
        walks = self.walks(count, gen)
        labels = torch.randint(0, 2, (count,), generator=gen)
        on = torch.ones(self.path_length + 1, dtype=torch.bool)
        if self.dash:
            on = torch.arange(self.path_length + 1) % (self.dash + 1) != self.dash
        images = torch.zeros(count, n, n, dtype=torch.long)
        rows = torch.arange(count).view(-1, 1, 1).expand(-1, self.curves, int(on.sum()))
        drawn = walks[:, :, on]
        images[rows, drawn[..., 0], drawn[..., 1]] = 1
        ends = torch.stack([walks[:, 0, 0], torch.where(labels.view(-1, 1) == 1, walks[:, 0, -1], walks[:, 1, -1])], 1)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                y, x = (ends[..., 0] + dy).clamp(0, n - 1), (ends[..., 1] + dx).clamp(0, n - 1)
                images[torch.arange(count).view(-1, 1), y, x] = 1
        tokens = torch.cat([images.flatten(1) + self.index["<background>"],
                            torch.full((count, 1), self.index["<answer>"])], 1)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = labels + self.index["<apart>"]
        return tokens, targets


LRA_TASKS = {"lra_text": LRAText, "lra_retrieval": LRARetrieval, "lra_image": LRAImage, "pathfinder": Pathfinder}
