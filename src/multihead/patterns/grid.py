"""Patterns on a 1-D, 2-D or 3-D grid of tokens: neighborhoods, shifted windows, axial attention.

Tokens of a grid are flattened row-major: for a grid ``(H, W)`` token ``t = y * W + x``; for
``(T, H, W)``, ``t = (z * H + y) * W + x``. A grid pattern needs ``q_len == kv_len == prod(grid)``.

Every pattern here allows, per query, a *box* of keys: on each axis an arithmetic progression of
coordinates ``start, start + step, ...`` (``count`` of them), and every combination of those per-axis
coordinates. Its spans are then one interval per line of the box along the last axis (when the
step on the last axis is 1), or one interval per key; ``_box_spans`` builds them in work linear in
queries x intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PatternError
from .base import Pattern, check_int
from .spans import Spans

# -- argument normalization ---------------------------------------------------------------------


def normalize_grid(owner: str, grid, *, dims: tuple[int, ...] = (1, 2, 3)) -> tuple[int, ...]:
    """``grid`` as a tuple of positive ints with a length in ``dims`` (an int is a 1-D grid)."""
    if grid is None:
        raise PatternError(f"{owner} needs grid=(...), the token layout (e.g. grid=(H, W))")
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid,)
    if not isinstance(grid, (tuple, list)) or len(grid) not in dims:
        shapes = " or ".join(f"{d}-D" for d in dims)
        raise PatternError(f"{owner}.grid must be a {shapes} tuple of sizes, got {grid!r}")
    for i, n in enumerate(grid):
        check_int(f"{owner}.grid[{i}]", n, minimum=1)
    return tuple(grid)


def per_axis(owner: str, name: str, value, ndim: int, *, minimum: int) -> tuple[int, ...]:
    """An int (same on every axis) or a tuple of ``ndim`` ints, each ``>= minimum``."""
    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            raise PatternError(
                f"{owner}.{name} must be an int or a tuple of {ndim} ints (one per grid axis), "
                f"got {value!r}")
        values = tuple(value)
    else:
        values = (value,) * ndim
    for i, v in enumerate(values):
        label = f"{owner}.{name}" if not isinstance(value, (tuple, list)) else f"{owner}.{name}[{i}]"
        check_int(label, v, minimum=minimum)
    return values


def per_axis_bool(owner: str, name: str, value, ndim: int) -> tuple[bool, ...]:
    if isinstance(value, bool):
        return (value,) * ndim
    if isinstance(value, (tuple, list)) and len(value) == ndim and all(
            isinstance(v, bool) for v in value):
        return tuple(value)
    raise PatternError(
        f"{owner}.{name} must be a bool or a tuple of {ndim} bools (one per grid axis), got "
        f"{value!r}")


def check_grid_lengths(owner: str, grid: tuple[int, ...], q_len: int, kv_len: int) -> None:
    tokens = math.prod(grid)
    if q_len != tokens or kv_len != tokens:
        raise PatternError(
            f"{owner} has grid={grid}, i.e. {tokens} tokens, but got q_len={q_len}, "
            f"kv_len={kv_len}; pass the grid whose product is the sequence length (queries and "
            f"keys are the same grid of tokens, flattened row-major)")


# -- coordinates and boxes ----------------------------------------------------------------------


def coords(idx: Tensor, grid: tuple[int, ...]) -> tuple[Tensor, ...]:
    """Per-axis coordinates of flat (row-major) token indices."""
    out = []
    for n in reversed(grid):
        out.append(idx % n)
        idx = idx // n
    return tuple(reversed(out))


@dataclass(frozen=True)
class AxisRange:
    """On one axis, the allowed key coordinates ``start + m * step`` for ``0 <= m < count``.

    ``start`` and ``count`` are ``(q_len,)`` tensors; ``max_count`` bounds ``count`` (a Python int, so
    the span count is known without a device sync).
    """

    start: Tensor
    count: Tensor
    step: int
    max_count: int


def box_spans(grid: tuple[int, ...], ranges: list[AxisRange], kv_len: int) -> Spans:
    """Spans of per-query boxes: one interval per line along the last axis (or per key)."""
    strides = [math.prod(grid[i + 1:]) for i in range(len(grid))]
    *outer, last = ranges
    q_len = last.start.shape[0]
    device = last.start.device
    offset = torch.zeros(q_len, 1, dtype=torch.long, device=device)
    valid = torch.ones(q_len, 1, dtype=torch.bool, device=device)

    def extend(r: AxisRange, stride: int) -> None:
        nonlocal offset, valid
        m = torch.arange(r.max_count, device=device)
        pos = (r.start[:, None] + m * r.step) * stride
        ok = m < r.count[:, None]
        offset = (offset[:, :, None] + pos[:, None, :]).flatten(1)
        valid = (valid[:, :, None] & ok[:, None, :]).flatten(1)

    for r, stride in zip(outer, strides):
        extend(r, stride)
    if last.step == 1:
        start = offset + last.start[:, None]
        end = start + last.count[:, None]
    else:
        extend(last, 1)
        start = offset
        end = start + 1
    start = torch.where(valid, start, torch.zeros_like(start))
    end = torch.where(valid, end, torch.zeros_like(end))
    return Spans(start[None, None], end[None, None], kv_len)


def contiguous_range(lo: Tensor, hi: Tensor, n: int, max_count: int) -> AxisRange:
    """The coordinates ``[lo, hi)`` clipped to ``[0, n)``, as an ``AxisRange``."""
    lo = lo.clamp(0, n)
    hi = hi.clamp(0, n)
    return AxisRange(lo, (hi - lo).clamp(min=0), 1, min(max_count, n))


class BoxPattern(Pattern):
    """A grid pattern whose keys for a query form a box: on each axis an ``AxisRange`` that depends
    only on the query's coordinate on that axis, so a pair is allowed when it is allowed on every
    axis.

    Subclasses give ``axis_range(axis, x)``; ``_spans`` follows. ``axis_class(axis, x)`` groups the
    coordinates that may share a query tile (the same dilation sub-grid, the same window), which a
    block-sparse backend uses to visit the grid tile by tile (``tiling_box``).
    """

    grid: tuple[int, ...] | None

    def axis_range(self, axis: int, x: Tensor) -> AxisRange:
        raise NotImplementedError

    def axis_class(self, axis: int, x: Tensor) -> Tensor:
        """Coordinates of one class may share a query tile (default: all of them)."""
        return torch.zeros_like(x)

    def tiling_box(self):
        return self if self.grid is not None and len(self.grid) >= 2 else None

    def _spans(self, q_pos, kv_len):
        ranges = [self.axis_range(i, x) for i, x in enumerate(coords(q_pos, self.grid))]
        return box_spans(self.grid, ranges, kv_len)

    def key_counts(self, q_len, kv_len, device=None):
        """A box holds the product of its per-axis counts: no spans built (a box has one interval
        per line of keys, 128 per query for a column of a 128 x 128 grid)."""
        if self.grid is None:
            return super().key_counts(q_len, kv_len, device)
        self._checked(q_len, kv_len)
        q_pos = torch.arange(q_len, device=device) + (kv_len - q_len)
        counts = torch.ones(q_len, dtype=torch.long, device=device)
        for i, x in enumerate(coords(q_pos, self.grid)):
            counts = counts * self.axis_range(i, x).count
        return counts.view(1, 1, q_len)


# -- neighborhood attention ---------------------------------------------------------------------


def _neighborhood_axis(a: Tensor, length: Tensor, kernel: int, stride: int, causal: bool):
    """First and one-past-last key index (within a dilation sub-grid of ``length``) for query ``a``."""
    if causal:
        # The stride group's leader is its last query (clipped to the sub-grid).
        leader = torch.minimum((a // stride) * stride + stride - 1, length - 1)
        return (leader - kernel + 1).clamp(min=0), a + 1
    # The leader is the group's center query (the right one of the two centers when stride is
    # even), clipped to the sub-grid; its window is centered on it and shifted inward at the edges.
    leader = torch.minimum((a // stride) * stride + stride // 2, length - 1)
    start = torch.minimum((leader - kernel // 2).clamp(min=0), length - kernel)
    return start, start + kernel


@dataclass(frozen=True)
class Neighborhood(BoxPattern):
    """Neighborhood attention on a 1-D, 2-D or 3-D grid, with NATTEN's exact semantics.

    Instead of every key, a query sees a ``kernel``-sized window of keys around it on every axis
    (Hassani et al., 2023, "Neighborhood Attention Transformer"), optionally dilated (Hassani & Shi,
    2022, "Dilated Neighborhood Attention Transformer"), causal per axis (Hassani et al., 2024,
    "Faster Neighborhood Attention") and strided (Hassani et al., 2025, "Generalized Neighborhood
    Attention"). ``kernel``, ``dilation``, ``stride`` and ``causal`` take an int/bool for every axis
    or a tuple with one value per axis; the normalized per-axis tuples are the attributes of the same
    names, and ``grid`` is the token layout, so a NATTEN backend maps ``na{1,2,3}d(kernel_size=kernel,
    dilation=dilation, stride=stride, is_causal=causal)`` directly.

    The convention, per axis of size ``n`` (query coordinate ``x``, key coordinate ``y``), is that of
    NATTEN's reference mask (``get_na_flex_mask`` in ``natten/backends/flex.py``, which agrees with
    ``get_window_start`` of its naive CPU kernels for stride 1):

    * dilation ``d``: the axis splits into ``d`` interleaved sub-grids ``g = x % d``; sub-grid ``g``
      holds coordinates ``g, g + d, ...``, i.e. ``L = n // d + (1 if g < n % d else 0)`` tokens.
      Query and key must share the sub-grid; inside it they have indices ``a = x // d``, ``b = y // d``
      and the sub-grid is attended as an undilated neighborhood of its own.
    * stride ``s``: queries are grouped ``[0, s), [s, 2s), ...`` inside the sub-grid; a group shares
      the window of its leader, ``min(group_start + s // 2, L - 1)`` (the center query, the right
      one of the two when ``s`` is even) when not causal, ``min(group_start + s - 1, L - 1)`` (the
      last query) when causal.
    * not causal: the window is ``[start, start + kernel)`` with
      ``start = clamp(leader - kernel // 2, 0, L - kernel)``: centered on the leader and shifted
      inward at the edges, so every query sees exactly ``kernel`` keys on the axis.
    * causal: ``b`` in ``[max(leader - kernel + 1, 0), a]``: the window ends at the query itself (a
      query sees ``kernel`` keys once far enough from the start, fewer before it, and with a stride
      the non-leader queries see fewer as well).

    A key is allowed when it is inside the window on every axis. An even kernel on a non-causal axis
    has ``kernel // 2`` keys before the leader and ``kernel // 2 - 1`` after it (NATTEN 0.21 accepts
    even kernels and places them so). Checks, per axis: ``kernel >= 1``, ``dilation >= 1`` with
    ``kernel * dilation <= n``, and ``1 <= stride <= kernel`` (NATTEN's rules, except that NATTEN
    also rejects ``kernel == 1``, a window of the query alone, which is allowed here).
    """

    kernel: tuple[int, ...] | int
    dilation: tuple[int, ...] | int = 1
    stride: tuple[int, ...] | int = 1
    causal: tuple[bool, ...] | bool = False
    grid: tuple[int, ...] | None = None

    def __post_init__(self):
        owner = "Neighborhood"
        grid = normalize_grid(owner, self.grid)
        ndim = len(grid)
        kernel = per_axis(owner, "kernel", self.kernel, ndim, minimum=1)
        dilation = per_axis(owner, "dilation", self.dilation, ndim, minimum=1)
        stride = per_axis(owner, "stride", self.stride, ndim, minimum=1)
        causal = per_axis_bool(owner, "causal", self.causal, ndim)
        for i in range(ndim):
            k, d, s, n = kernel[i], dilation[i], stride[i], grid[i]
            if k * d > n:
                raise PatternError(
                    f"Neighborhood.kernel[{i}] * dilation[{i}] = {k} * {d} = {k * d} exceeds the "
                    f"grid size {n} on axis {i}; use a smaller kernel or dilation (each of the {d} "
                    f"dilated sub-grids must hold a whole window)")
            if s > k:
                raise PatternError(
                    f"Neighborhood.stride[{i}]={s} exceeds kernel[{i}]={k}; use a stride between 1 "
                    f"and the kernel size (a larger stride would leave keys no query sees)")
        for name, value in (("grid", grid), ("kernel", kernel), ("dilation", dilation),
                            ("stride", stride), ("causal", causal)):
            object.__setattr__(self, name, value)

    def check(self, q_len, kv_len):
        check_grid_lengths("Neighborhood", self.grid, q_len, kv_len)

    def _axis_window(self, i: int, x: Tensor):
        """Sub-grid group, and window ``[lo, hi)`` in sub-grid indices, of query coordinate ``x``."""
        n, k, d, s = self.grid[i], self.kernel[i], self.dilation[i], self.stride[i]
        g = x % d
        length = torch.where(g < n % d, n // d + 1, n // d)
        lo, hi = _neighborhood_axis(x // d, length, k, s, self.causal[i])
        return g, lo, hi

    def mask_mod(self, b, h, q_idx, kv_idx):
        allowed = None
        for i, (qx, ky) in enumerate(zip(coords(q_idx, self.grid), coords(kv_idx, self.grid))):
            g, lo, hi = self._axis_window(i, qx)
            kb = ky // self.dilation[i]
            ok = (ky % self.dilation[i] == g) & (kb >= lo) & (kb < hi)
            allowed = ok if allowed is None else allowed & ok
        return allowed

    def axis_range(self, axis, x):
        g, lo, hi = self._axis_window(axis, x)
        d = self.dilation[axis]
        return AxisRange(lo * d + g, hi - lo, d, self.kernel[axis])

    def axis_class(self, axis, x):
        return x % self.dilation[axis]


# -- shifted windows ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShiftedWindow(BoxPattern):
    """Swin's (shifted) window attention on a 2-D grid (Liu et al., 2021, "Swin Transformer").

    Instead of every key, a query sees the keys of its window. Swin rolls the feature map by
    ``-shift``, partitions it into ``window``-sized windows, and masks pairs from different regions
    of the wrapped-around windows. In the unshifted coordinates used here this is a plain,
    non-cyclic partition of each axis into ``[0, shift), [shift, shift + window),
    [shift + window, shift + 2 * window), ...``, the last group cut at the grid's edge; a token's
    group on an axis of size n is ``(x + window - shift) // window``. Two tokens may meet when they
    share the group on both axes. ``shift=0`` is the plain (non-shifted) window attention of Swin's
    even blocks. A size that the window does not divide behaves as Swin's padding at the bottom/
    right edge with the padded tokens left out.

    ``window`` and ``shift`` are an int (both axes) or a pair; per axis ``1 <= window <= grid`` and
    ``0 <= shift < window``.
    """

    window: tuple[int, int] | int
    shift: tuple[int, int] | int = 0
    grid: tuple[int, int] | None = None

    def __post_init__(self):
        owner = "ShiftedWindow"
        grid = normalize_grid(owner, self.grid, dims=(2,))
        window = per_axis(owner, "window", self.window, 2, minimum=1)
        shift = per_axis(owner, "shift", self.shift, 2, minimum=0)
        for i in range(2):
            if window[i] > grid[i]:
                raise PatternError(
                    f"ShiftedWindow.window[{i}]={window[i]} exceeds the grid size {grid[i]} on axis "
                    f"{i}; use a window no larger than the grid")
            if shift[i] >= window[i]:
                raise PatternError(
                    f"ShiftedWindow.shift[{i}]={shift[i]} must be smaller than window[{i}]="
                    f"{window[i]} (Swin shifts by window // 2); use 0 <= shift < window")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "shift", shift)

    def check(self, q_len, kv_len):
        check_grid_lengths("ShiftedWindow", self.grid, q_len, kv_len)

    def _group(self, i: int, x: Tensor) -> Tensor:
        return (x + self.window[i] - self.shift[i]) // self.window[i]

    def mask_mod(self, b, h, q_idx, kv_idx):
        qc, kc = coords(q_idx, self.grid), coords(kv_idx, self.grid)
        return ((self._group(0, qc[0]) == self._group(0, kc[0]))
                & (self._group(1, qc[1]) == self._group(1, kc[1])))

    def axis_range(self, axis, x):
        w, s = self.window[axis], self.shift[axis]
        lo = self._group(axis, x) * w + s - w
        return contiguous_range(lo, lo + w, self.grid[axis], w)

    def axis_class(self, axis, x):
        return self._group(axis, x)


# -- axial attention ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Axial(BoxPattern):
    """Attention along one axis of a 2-D or 3-D grid (Ho et al., 2019, "Axial Attention in
    Multidimensional Transformers"; Wang et al., 2020, "Axial-DeepLab").

    Instead of every key, a query sees the keys that share its coordinates on every other axis: a
    row (``axis=-1`` on a 2-D grid), a column (``axis=0``), a time line (``axis=0`` of ``(T, H, W)``).
    ``axis`` may be negative, counted from the last axis; the attribute holds it normalized.
    """

    grid: tuple[int, ...]
    axis: int

    def __post_init__(self):
        grid = normalize_grid("Axial", self.grid, dims=(2, 3))
        if isinstance(self.axis, bool) or not isinstance(self.axis, int) or not (
                -len(grid) <= self.axis < len(grid)):
            raise PatternError(
                f"Axial.axis must be an int in [{-len(grid)}, {len(grid) - 1}] for the "
                f"{len(grid)}-D grid {grid}, got {self.axis!r}")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "axis", self.axis % len(grid))

    def check(self, q_len, kv_len):
        check_grid_lengths("Axial", self.grid, q_len, kv_len)

    def mask_mod(self, b, h, q_idx, kv_idx):
        allowed = None
        for i, (qx, ky) in enumerate(zip(coords(q_idx, self.grid), coords(kv_idx, self.grid))):
            if i == self.axis:
                continue
            ok = qx == ky
            allowed = ok if allowed is None else allowed & ok
        return allowed

    def axis_range(self, axis, x):
        if axis == self.axis:
            return AxisRange(torch.zeros_like(x), torch.full_like(x, self.grid[axis]), 1, self.grid[axis])
        return AxisRange(x, torch.ones_like(x), 1, 1)
