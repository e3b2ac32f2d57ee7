"""``TopK``'s choice of keys: each row's largest scores, selected by the native kernel where it runs.

``torch.topk`` over rows of thousands of scores took two thirds of a ``TopK`` pattern's choice on
CPU (the rest is the ``q . k`` product); the kernel's ``top_keys`` (``select.cpp``) keeps the
values above a threshold reached by at least ``keep`` of them and picks among those. The kernel
also makes the scores itself (``top_keys_of_products``), a block of rows at a time that
stays in L2 until it is selected from: a whole chunk of logits written to memory and read back
cost as much as the product. bfloat16 scores are products of bf16 pairs (AVX-512 BF16) summed in
float32, float16 ones widened: neither is rounded to its type before the choice.

Long float32 rows (``SCREEN_KEYS``) are screened: ranked by products of their bf16-rounded values
(twice the multiply-adds per instruction), whose error against the float32 products has a bound;
only the keys within twice that bound of the cut are scored again in float32, in the plain path's
order of operations, and chosen from. The keys kept are the plain float32 choice's, to the bit.
"""

from __future__ import annotations

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
"""A float32 choice whose rows see this many keys or more (and 32 x ``keep``), on average, ranks
bf16 products first (AVX-512 BF16: twice the multiply-adds per instruction), then scores the keys
within their error bound of the cut again in float32, as the plain path scores them: it keeps the
same keys. Below it the rescoring costs what the halved products save (measured: 0.92-0.98 x the
unscreened time at 2048 keys, 0.84-0.90 at 4096, 0.68 at 16k; 1.02-1.11 at 512-1024)."""


def fused_choice(q: Tensor, k: Tensor) -> bool:
    """Whether ``top_keys_of_products`` runs on ``q`` and ``k``: CPU, float32, bfloat16 or float16
    (both of one type), kernel built."""
    cpu = q.device.type == "cpu" and k.device.type == "cpu"
    return cpu and q.dtype == k.dtype and q.dtype in _FUSED_TYPES and kernel() is not None


def top_keys_of_products(q: Tensor, k: Tensor, keep: int, start: Tensor | None, end: Tensor | None,
                         indices: Tensor, valid: Tensor, screen_keys: int | None = None) -> int:
    """``top_keys(q @ k^T, keep)`` without the logits in memory, written into ``indices`` and
    ``valid``, both ``(B, H, rows, keep)``. ``q`` is ``(B, H, rows, d)``, ``k`` ``(B, H_kv, n, d)``
    (a head group shares its key head); with ``start`` / ``end`` ``(B', H', rows, I)`` (B' and H' 1
    or full), a row sees only the keys of its intervals ``[start, end)`` (others score -inf). Needs
    ``fused_choice(q, k)``.

    float32 rows that see ``screen_keys`` keys or more on average (default ``SCREEN_KEYS``; -1:
    never) are screened by bf16 products where the CPU has them: the same keys, chosen faster.
    Returns the number of rows screened."""
    none = q.new_empty(0, dtype=torch.long)
    screen_keys = max(SCREEN_KEYS, 32 * keep) if screen_keys is None else screen_keys
    if start is not None:
        shape = q.shape[:3] + start.shape[-1:]
        start, end = start.expand(shape).contiguous(), end.expand(shape).contiguous()
    return kernel().top_keys_of_products(_rows_contiguous(q), _rows_contiguous(k), keep,
                                         none if start is None else start, none if end is None else end,
                                         indices, valid, screen_keys)


def _rows_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
