"""``TopK``'s choice of keys: each row's largest scores, selected by the native kernel where it runs.

``torch.topk`` over rows of thousands of scores took two thirds of a ``TopK`` pattern's choice on
CPU (the rest is the ``q . k`` product); the kernel's ``top_keys`` (``select.cpp``) keeps the
values above a threshold reached by at least ``keep`` of them and picks among those. The kernel
also makes the scores itself (``top_keys_of_products``), a block of rows at a time that
stays in L2 until it is selected from: a whole chunk of logits written to memory and read back
cost as much as the product. bfloat16 scores are products of bf16 pairs (AVX-512 BF16) summed in
float32, float16 ones widened: neither is rounded to its type before the choice.

Long float32 rows (``SCREEN_KEYS``) are screened: ranked first by products of their int8-rounded
values (AVX-512 VNNI: four times the multiply-adds of a float32 instruction) or bf16-rounded ones
(AVX-512 BF16: twice), whose error against the float32 products has a bound; only the keys within
twice that bound of the cut are scored again in float32, in the plain path's order of operations,
and chosen from. The keys kept are the plain float32 choice's, to the bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import kernel


def top_keys(scores: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """``(indices, valid)``, both ``(..., keep)``: the positions of the ``keep`` largest entries of
    each row of ``scores`` ``(..., n)`` in ascending order, and whether each entry is above -inf.
    NaN ranks above every number (as in ``torch.topk``); among equal scores at the cut, which one
    is kept is unspecified. float32 on CPU runs in the native kernel, anything else in
    ``torch.topk``."""
    ext = kernel() if scores.device.type == "cpu" and scores.dtype == torch.float32 else None
    if ext is None:
        top = scores.topk(keep, dim=-1)
        indices, order = top.indices.sort(-1)
        return indices, (top.values > float("-inf")).gather(-1, order)
    indices, valid = ext.top_keys(scores.reshape(-1, scores.shape[-1]).contiguous(), keep)
    shape = scores.shape[:-1] + (keep,)
    return indices.view(shape), valid.view(shape)


_FUSED_TYPES = (torch.float32, torch.bfloat16, torch.float16)

SCREEN_KEYS = 2048
"""A float32 choice whose rows see this many keys or more (and ``SCREEN_RATIO`` x ``keep``), on
average, is screened: int8 or bf16 products first, then the keys within their error bound of the
cut scored again in float32, as the plain path scores them: it keeps the same keys. Below it the
rescoring costs what the cheaper products save (int8 screened / unscreened, measured side by
side: 0.85 at 2048 keys and keep 16, 1.12 at 1024; 0.76-0.96 where keys are 64 x keep, 0.96-1.12
at 32 x keep)."""

SCREEN_RATIO = 64
"""...and whose rows see this many keys per kept one, or more: fewer, and the band of candidates
near the cut costs what the cheaper products save."""

SCREEN_BY = "auto"
"""The screen's products: "auto" (int8 where their bound is within 3 x the bf16 one on average,
else bf16), "int8" or "bf16"."""


def screens() -> list[str]:
    """The products this build of the kernel can screen with: "int8" (AVX-512 VNNI), "bf16"
    (AVX-512 BF16); none without the kernel."""
    ext = kernel()
    return list(ext.screens()) if ext is not None else []


def fused_choice(q: Tensor, k: Tensor) -> bool:
    """Whether ``top_keys_of_products`` runs on ``q`` and ``k``: CPU, float32, bfloat16 or float16
    (both of one type), kernel built."""
    cpu = q.device.type == "cpu" and k.device.type == "cpu"
    return cpu and q.dtype == k.dtype and q.dtype in _FUSED_TYPES and kernel() is not None


class Screened(NamedTuple):
    """How a float32 choice was screened: ``rows`` ranked by ``by`` products ("int8" or "bf16")
    first, then rescored; ``(0, "")`` when none were."""
    rows: int
    by: str


def top_keys_of_products(q: Tensor, k: Tensor, keep: int, start: Tensor | None, end: Tensor | None,
                         indices: Tensor, valid: Tensor, screen_keys: int | None = None,
                         screen_by: str | None = None) -> Screened:
    """``top_keys(q @ k^T, keep)`` without the logits in memory, written into ``indices`` and
    ``valid``, both ``(B, H, rows, keep)``. ``q`` is ``(B, H, rows, d)``, ``k`` ``(B, H_kv, n, d)``
    (a head group shares its key head); with ``start`` / ``end`` ``(B', H', rows, I)`` (B' and H' 1
    or full), a row sees only the keys of its intervals ``[start, end)`` (others score -inf). Needs
    ``fused_choice(q, k)``.

    float32 rows that see ``screen_keys`` keys or more on average (default ``SCREEN_KEYS``; -1:
    never) are screened where the CPU has the products: the same keys, chosen faster. ``screen_by``
    (default ``SCREEN_BY``) "auto" takes int8 products (AVX-512 VNNI) where their error bound is
    at most 3 x the bf16 one on average over rows, else bf16 products (AVX-512 BF16); "int8" or
    "bf16" takes only that one (``screens()`` lists what this build has)."""
    none = q.new_empty(0, dtype=torch.long)
    screen_keys = max(SCREEN_KEYS, SCREEN_RATIO * keep) if screen_keys is None else screen_keys
    if start is not None:
        shape = q.shape[:3] + start.shape[-1:]
        start, end = start.expand(shape).contiguous(), end.expand(shape).contiguous()
    rows, by = kernel().top_keys_of_products(_rows_contiguous(q), _rows_contiguous(k), keep,
                                             none if start is None else start, none if end is None else end,
                                             indices, valid, screen_keys, screen_by or SCREEN_BY)
    return Screened(rows, by)


def _rows_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
