"""Patterns defined by data: packed documents and key padding."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import PatternError
from .base import Pattern
from .spans import Spans


def _runs(ids: Tensor) -> tuple[Tensor, Tensor]:
    """For each position of ``ids`` (shape ``(B, N)``), the start and end of its run of equal values."""
    n = ids.shape[-1]
    pos = torch.arange(n, device=ids.device).expand_as(ids)
    new_run = torch.ones_like(ids, dtype=torch.bool)
    new_run[:, 1:] = ids[:, 1:] != ids[:, :-1]
    start = torch.where(new_run, pos, torch.zeros_like(pos)).cummax(-1).values
    run_end = torch.ones_like(new_run)
    run_end[:, :-1] = new_run[:, 1:]
    end_here = torch.where(run_end, pos + 1, torch.full_like(pos, n))
    end = end_here.flip(-1).cummin(-1).values.flip(-1)
    return start, end


@dataclass(frozen=True, eq=False)
class Documents(Pattern):
    """Packed sequences: a token sees only tokens of its own document.

    Give either ``cu_seqlens`` (FlashAttention's convention: ``[0, l1, l1+l2, ..., total]``, the same
    split for every batch element) or ``doc_ids`` (``(N,)`` or ``(batch, N)``: equal ids mark one
    document, each a contiguous run). Combine with ``Causal()`` for packed causal training
    (Krell et al., 2021, "Efficient Sequence Packing without Cross-contamination"). Queries and keys
    come from the same packed stream, so ``q_len`` must equal ``kv_len``.
    """

    doc_ids: Tensor = field(repr=False)

    def __init__(self, cu_seqlens: Tensor | None = None, *, doc_ids: Tensor | None = None):
        if (cu_seqlens is None) == (doc_ids is None):
            raise PatternError("Documents needs exactly one of cu_seqlens or doc_ids")
        if cu_seqlens is not None:
            ids = self._ids_from_cu_seqlens(torch.as_tensor(cu_seqlens))
        else:
            ids = torch.as_tensor(doc_ids)
            if ids.dim() == 1:
                ids = ids.unsqueeze(0)
            if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise PatternError(
                    f"doc_ids must be an integer tensor of shape (N,) or (batch, N), got "
                    f"{tuple(ids.shape)} {ids.dtype}")
            start, _ = _runs(ids)
            runs = (start == torch.arange(ids.shape[1], device=ids.device)).sum(-1)
            distinct = torch.tensor([row.unique().numel() for row in ids], device=ids.device)
            if (runs != distinct).any():
                raise PatternError(
                    "doc_ids must mark each document as one contiguous run of tokens (packed "
                    "sequences); reorder the tokens or give each run its own id")
        object.__setattr__(self, "doc_ids", ids.long())

    @staticmethod
    def _ids_from_cu_seqlens(cu: Tensor) -> Tensor:
        if cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point:
            raise PatternError(f"cu_seqlens must be a 1-D integer tensor [0, ..., total], got {cu!r}")
        if cu[0] != 0 or (cu[1:] <= cu[:-1]).any():
            raise PatternError(
                f"cu_seqlens must start at 0 and increase strictly (no empty documents), got "
                f"{cu.tolist()}")
        positions = torch.arange(int(cu[-1]), device=cu.device)
        return torch.searchsorted(cu[1:].long(), positions, right=True).unsqueeze(0)

    @property
    def batch_size(self) -> int | None:
        return self.doc_ids.shape[0] if self.doc_ids.shape[0] > 1 else None

    @property
    def length(self) -> int:
        return self.doc_ids.shape[1]

    def __repr__(self):
        return f"Documents(batch={self.doc_ids.shape[0]}, tokens={self.length})"

    def check(self, q_len, kv_len):
        if q_len != kv_len or kv_len != self.length:
            raise PatternError(
                f"Documents covers {self.length} packed tokens but got q_len={q_len}, "
                f"kv_len={kv_len}; queries and keys must be that same packed stream")

    def mask_mod(self, b, h, q_idx, kv_idx):
        ids = self.doc_ids.to(q_idx.device)
        row = b % ids.shape[0]  # one split shared by every batch element, or one per element
        return ids[row, q_idx] == ids[row, kv_idx]

    def _spans(self, q_pos, kv_len):
        start, end = _runs(self.doc_ids.to(q_pos.device))
        return Spans.interval(start[:, None, q_pos], end[:, None, q_pos], kv_len)


@dataclass(frozen=True, eq=False)
class KeyPadding(Pattern):
    """Keys marked as padding are seen by no query.

    ``key_padding_mask`` is a bool tensor ``(batch, kv_len)`` where True marks padding, the
    convention of ``torch.nn.MultiheadAttention``.
    """

    key_padding_mask: Tensor = field(repr=False)

    def __post_init__(self):
        m = self.key_padding_mask
        if not isinstance(m, Tensor) or m.dtype != torch.bool or m.dim() != 2:
            raise PatternError(
                f"key_padding_mask must be a bool tensor of shape (batch, kv_len) with True at "
                f"padded keys, got {getattr(m, 'dtype', type(m))} {tuple(getattr(m, 'shape', ()))}")

    @property
    def batch_size(self) -> int | None:
        return self.key_padding_mask.shape[0]

    def __repr__(self):
        return f"KeyPadding(batch={self.key_padding_mask.shape[0]})"

    def check(self, q_len, kv_len):
        if self.key_padding_mask.shape[1] != kv_len:
            raise PatternError(
                f"key_padding_mask has {self.key_padding_mask.shape[1]} keys but the keys have "
                f"length {kv_len}")

    def mask_mod(self, b, h, q_idx, kv_idx):
        keep = ~self.key_padding_mask.to(kv_idx.device)
        return keep[b, kv_idx]

    def _spans(self, q_pos, kv_len):
        keep = ~self.key_padding_mask.to(q_pos.device)
        pos = torch.arange(kv_len, device=q_pos.device)
        edge = torch.diff(keep.long(), dim=-1, prepend=keep.new_zeros(keep.shape[0], 1).long(),
                          append=keep.new_zeros(keep.shape[0], 1).long())
        runs = max(int((edge == 1).sum(-1).max()), 1)
        # The k-th run of kept keys in every batch row, padded with empty intervals.
        starts = torch.full((keep.shape[0], runs), kv_len, device=q_pos.device)
        ends = torch.full_like(starts, kv_len)
        for target, marker in ((starts, 1), (ends, -1)):
            hit = edge[:, : kv_len + 1] == marker
            rank = hit.long().cumsum(-1) - 1
            rows, cols = hit.nonzero(as_tuple=True)
            target[rows, rank[rows, cols]] = torch.cat([pos, pos.new_tensor([kv_len])])[cols]
        shape = (keep.shape[0], 1, q_pos.shape[0], runs)
        return Spans(starts[:, None, None, :].expand(shape), ends[:, None, None, :].expand(shape), kv_len)
