"""``TopK``'s choice of keys: each row's largest scores, selected by the native kernel where it runs.

``torch.topk`` over rows of thousands of scores took two thirds of a ``TopK`` pattern's choice on
CPU (the rest is the ``q . k`` product); the kernel's ``top_keys`` (``select.cpp``) keeps the
values above a threshold reached by at least ``keep`` of them and picks among those.
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
