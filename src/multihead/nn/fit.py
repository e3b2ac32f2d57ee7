"""Far-reaching Interleaved Transformers (FIT: Chen & Li, 2023, "FIT: Far-reaching Interleaved
Transformers", arXiv 2305.12689).

Against one self-attention over all ``N`` tokens, FIT splits the data tokens into groups of ``group``
consecutive tokens, each with ``latents`` latent tokens of its own, and interleaves:

1. local attention: each group's data tokens attend within the group (``BlockLocal(group)``);
2. write: each group's latents cross-attend to their group's data tokens;
3. global attention: all latents of all groups attend to one another (``N / group * latents`` tokens);
4. read: each group's data tokens cross-attend to their group's latents.

Every step has a residual; data and latents meet only within their group, and groups meet only
through the latents, so the cost is ``O(N * group + (N / group * latents)^2)``. Cross-attention within
groups runs as one ``multihead.attention`` call with the groups in the batch dimension. The latents
start from learned vectors shared by all groups (plus a learned group position).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from ..patterns import BlockLocal
from .attention import MultiHeadAttention, check_inputs


class FITBlock(nn.Module):
    """One FIT layer stack (module docstring) on ``(batch, N, dim)`` data tokens, ``N`` a multiple of
    ``group`` and at most ``max_groups * group``; returns the data tokens' update (``x + block(x)`` is
    the block). ``**options`` go to every ``MultiHeadAttention``."""

    pattern_restricts_mixing = False  # the latents mix every group

    def __init__(self, dim: int, heads: int, group: int, latents: int = 4, max_groups: int = 64, **options):
        super().__init__()
        for name, value in (("group", group), ("latents", latents), ("max_groups", max_groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ShapeError(f"{name} must be a positive integer, got {value!r}")
        if "pattern" in options:
            raise ShapeError("FITBlock sets its own patterns; drop pattern=")
        self.dim, self.group, self.latents, self.max_groups = dim, group, latents, max_groups
        self.local = MultiHeadAttention(dim, heads, pattern=BlockLocal(group), **options)
        self.write = MultiHeadAttention(dim, heads, **options)
        self.glob = MultiHeadAttention(dim, heads, **options)
        self.read = MultiHeadAttention(dim, heads, **options)
        self.latent_init = nn.Parameter(torch.randn(latents, dim) * dim ** -0.5)
        self.group_position = nn.Parameter(torch.zeros(max_groups, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        check_inputs(x, None, self.dim)
        batch, length, dim = x.shape
        if length % self.group or length // self.group > self.max_groups:
            raise ShapeError(f"x has {length} tokens; FITBlock needs a multiple of group ({self.group}) up to "
                             f"{self.max_groups} groups")
        groups = length // self.group
        data = x + self.local(x)
        per_group = data.reshape(batch * groups, self.group, dim)
        lat = (self.latent_init + self.group_position[:groups]).expand(batch, groups, self.latents, dim)
        lat = lat.reshape(batch * groups, self.latents, dim)
        lat = lat + self.write(lat, per_group)  # latents read their group's data
        flat = lat.reshape(batch, groups * self.latents, dim)
        flat = flat + self.glob(flat)  # every latent with every latent
        lat = flat.reshape(batch * groups, self.latents, dim)
        per_group = per_group + self.read(per_group, lat)  # data read their group's latents
        return per_group.reshape(batch, length, dim) - x
