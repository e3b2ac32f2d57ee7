"""Logit soft-capping (Gemma 2, 2024, arXiv 2408.00118)."""

from __future__ import annotations

import math

import torch

from ..errors import ShapeError
from .base import Score


class Softcap(Score):
    """Replaces the logit s by ``cap * tanh(s / cap)``, bounding it to ``(-cap, cap)``.

    Not additive, so SDPA cannot serve it; the reference (and later the block-sparse and flex
    backends) apply it to the logits.
    """

    def __init__(self, cap: float):
        super().__init__()
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
            raise ShapeError(f"Softcap.cap must be a positive finite number, got {cap!r}")
        self.cap = float(cap)

    def forward(self, score, b, h, q_idx, kv_idx):
        return self.cap * torch.tanh(score / self.cap)

    def extra_repr(self) -> str:
        return f"cap={self.cap}"
