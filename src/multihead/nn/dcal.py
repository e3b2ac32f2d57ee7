"""Dual Cross-Attention Learning (Zhu et al., 2022, "Dual Cross-Attention Learning for Fine-Grained
Visual Categorization and Object Re-Identification", arXiv 2205.02151).

Two cross-attentions beside a ViT's self-attention:

- **Global-local cross-attention** (GLCA): against self-attention, only the ``R`` tokens with the
  highest accumulated attention from the class token (``attention_rollout``: the layers' head-averaged
  maps, each mixed half-and-half with the identity, multiplied from the first layer up) act as queries;
  they attend to all tokens' keys and values. ``GlobalLocalCrossAttention`` selects them and runs one
  ``multihead.attention`` call with ``R`` queries and ``N`` keys.
- **Pair-wise cross-attention** (PWCA, training only): the queries of one image attend to the keys
  and values of both images of a pair (its own and a distractor's, concatenated), so the softmax is
  spread over the distractor too. ``PairWiseCrossAttention``: one call with ``N`` queries, ``2N`` keys.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ShapeError
from .attention import MultiHeadAttention, attend, check_inputs


def attention_rollout(maps) -> Tensor:
    """``(batch, N, N)``: ``S_L ... S_1`` with ``S_l = (mean over heads of maps[l] + I) / 2`` (each
    ``maps[l]`` is ``(batch, heads, N, N)``, first layer first). Row 0 is the class token's rollout."""
    maps = list(maps)
    if not maps:
        raise ShapeError("attention_rollout needs at least one layer's attention map")
    shape = maps[0].shape
    if any(m.dim() != 4 or m.shape != shape or m.shape[-1] != m.shape[-2] for m in maps):
        raise ShapeError(f"every map must be (batch, heads, N, N) of one shape, got {[tuple(m.shape) for m in maps]}")
    eye = torch.eye(shape[-1], dtype=maps[0].dtype, device=maps[0].device)
    out = None
    for m in maps:
        s = (m.mean(1) + eye) / 2
        out = s if out is None else s @ out
    return out


class GlobalLocalCrossAttention(MultiHeadAttention):
    """GLCA (module docstring): ``forward(x, scores, keep)`` lets the ``keep`` tokens with the highest
    ``scores`` ``(batch, N)`` (e.g. ``attention_rollout(maps)[:, 0]``) query every token; returns their
    outputs ``(batch, keep, dim)`` and their indices ``(batch, keep)``."""

    pattern_restricts_mixing = False

    def forward(self, x: Tensor, scores: Tensor, keep: int):
        check_inputs(x, None, self.dim)
        if not isinstance(scores, Tensor) or scores.shape != x.shape[:2]:
            raise ShapeError(f"scores must be (batch, tokens) = {tuple(x.shape[:2])}, got {getattr(scores, 'shape', scores)!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= x.shape[1]:
            raise ShapeError(f"keep must be an integer in [1, {x.shape[1]}], got {keep!r}")
        index = scores.detach().topk(keep, dim=1).indices.sort(1).values
        local = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        q, _, _ = self.project(local, local)
        _, k, v = self.project(x, x)
        out, _ = attend(self, q, k, v)
        return self.combine(out, local), index


class PairWiseCrossAttention(MultiHeadAttention):
    """PWCA (module docstring): ``forward(x, distractor)``, the queries of ``x`` over the keys and
    values of ``x`` and ``distractor`` together (both ``(batch, N, dim)``)."""

    pattern_restricts_mixing = False

    def forward(self, x: Tensor, distractor: Tensor):
        check_inputs(x, distractor, self.dim)
        both = torch.cat([x, distractor], 1)
        q, k, v = self.project(x, both)
        out, _ = attend(self, q, k, v)
        return self.combine(out, x)
