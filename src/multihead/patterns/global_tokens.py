"""Global tokens: a few tokens that see, and are seen by, every token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PatternError
from .base import Pattern, check_int
from .spans import Spans


@dataclass(frozen=True)
class GlobalTokens(Pattern):
    """The first ``n`` tokens see every key and are seen by every query (Beltagy et al., 2020,
    "Longformer", global attention; also the global tokens of BigBird and ETC).

    On its own it allows only those pairs; combine it with a local pattern, as Longformer does:
    ``GlobalTokens(n) | SlidingWindow(w, w)``. Positions are in the key frame, so with a cache the
    global tokens are the first ``n`` keys and a query is global when its position is below ``n``.
    ``n`` must be smaller than ``kv_len`` (with ``n >= kv_len`` every pair is allowed: use ``Full()``).
    """

    n: int

    def __post_init__(self):
        check_int("GlobalTokens.n", self.n, minimum=1)

    def check(self, q_len, kv_len):
        if self.n >= kv_len:
            raise PatternError(
                f"GlobalTokens(n={self.n}) makes all {kv_len} keys global, which allows every "
                f"pair; use Full(), or n < kv_len")

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (q_idx < self.n) | (kv_idx < self.n)

    def _spans(self, q_pos, kv_len):
        end = torch.where(q_pos < self.n, kv_len, self.n)
        return Spans.interval(torch.zeros_like(q_pos), end, kv_len)
