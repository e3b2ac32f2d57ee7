"""A small vision transformer around any attention variant: flat, hierarchical or two-branch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from ..vision.builders import TwoBranchBuild, VisionBuild
from .block import TransformerBlock


def _pair(name: str, value) -> tuple[int, int]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ShapeError(f"VisionTransformer.{name} must be a positive int or a pair (height, width), got {value!r}")
    return values


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapeError(f"VisionTransformer.{name} must be a positive integer, got {value!r}")
    return value


def resolve_attention(attention) -> Callable[..., nn.Module]:
    """A catalog name, a catalog ``Variant`` or a ``build(dim, heads, seq_len)`` callable."""
    from .. import catalog

    if isinstance(attention, str):
        return catalog.get(attention).build
    if isinstance(attention, catalog.Variant):
        return attention.build
    if callable(attention):
        return attention
    raise ShapeError(f"VisionTransformer.attention must be a catalog name (multihead list), a Variant or a "
                     f"build(dim, heads, seq_len) callable, got {type(attention).__name__}")


class PatchMerging(nn.Module):
    """Swin's patch merging: each 2x2 group of tokens, concatenated (``4 * dim``), normalized and
    projected to ``2 * dim``; the grid halves on both axes."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        batch, _, dim = x.shape
        rows, cols = grid
        x = x.view(batch, rows // 2, 2, cols // 2, 2, dim).permute(0, 1, 3, 4, 2, 5)
        return self.reduction(self.norm(x.reshape(batch, rows // 2 * (cols // 2), 4 * dim)))


def _stage_depths(depth: int) -> list[int]:
    """Stages of two blocks (a regular/shifted pair), the last one shorter for an odd depth."""
    return [2] * (depth // 2) + [depth % 2] * (depth % 2)


class VisionTransformer(nn.Module):
    """A vision transformer (Dosovitskiy et al., 2020, arXiv 2010.11929) around any attention.

    Images ``(batch, in_channels, H, W)`` are cut into ``patch x patch`` patches, embedded (a
    strided convolution) with learned absolute positions, run through ``depth`` pre-norm
    ``TransformerBlock``s whose attention is ``attention`` - a catalog name (``multihead list``),
    a ``Variant`` or a ``build(dim, heads, seq_len)`` callable - then mean-pooled, normalized and
    classified into ``num_classes`` logits. The block decides the shape of the model:

    * token variants (``mha``, ``gqa``, a pattern, ...): one stage on the ``H/patch x W/patch`` grid;
    * vision blocks (family ``vision``) get their layer index, so they alternate as their papers do
      (Swin's shifted windows on odd layers, DiNAT's dilations, DaViT's spatial/channel attention),
      and hierarchical ones (Swin, CSWin, NAT, ...; a builder asks with ``hierarchical = True``)
      run in stages of two blocks with Swin's patch merging between stages (width and heads double,
      the grid halves while both sides are even and at least 4);
    * ``crossvit`` runs CrossViT's two branches, patches of ``patch`` and ``2 * patch`` with a CLS
      token each, fused by cross-attention at every layer; the logits are the mean of the two
      branches' classifiers.

    ``class_token="post"`` (one-stage models only) appends a learned class token after the image
    tokens and classifies from it instead of the mean: iLLaMA's post-sequence class token, with which
    a causal attention (``illama``) still lets the class token read the whole image.
    """

    def __init__(self, image_size, patch, dim: int, depth: int, heads: int, attention="mha", *,
                 in_channels: int = 3, num_classes: int = 10, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 class_token: str | None = None):
        super().__init__()
        if class_token not in (None, "post"):
            raise ShapeError(f"VisionTransformer.class_token must be None (mean pooling) or 'post', got {class_token!r}")
        self.image_size, self.patch = _pair("image_size", image_size), _pair("patch", patch)
        for name, value in (("dim", dim), ("depth", depth), ("heads", heads), ("in_channels", in_channels),
                            ("num_classes", num_classes)):
            _positive(name, value)
        build = resolve_attention(attention)
        self.two_branch = isinstance(build, TwoBranchBuild)
        patches = [self.patch] + ([tuple(2 * p for p in self.patch)] if self.two_branch else [])
        for p in patches:
            if any(n % q for n, q in zip(self.image_size, p)):
                raise ShapeError(f"VisionTransformer.patch {p} must divide image_size {self.image_size}"
                                 + (" (CrossViT's second branch uses patches twice as large)" if self.two_branch
                                    else ""))
        if class_token is not None and isinstance(build, (VisionBuild, TwoBranchBuild)):
            raise ShapeError("VisionTransformer.class_token='post' needs a token variant (vision blocks lay "
                             "their tokens out on the grid; CrossViT has a class token per branch)")
        self.grids = [tuple(n // q for n, q in zip(self.image_size, p)) for p in patches]
        self.embeds = nn.ModuleList(nn.Conv2d(in_channels, dim, p, stride=p) for p in patches)
        extra = 1 if self.two_branch or class_token else 0
        self.positions = nn.ParameterList(
            nn.Parameter(torch.randn(1, extra + g[0] * g[1], dim) * 0.02) for g in self.grids)
        self.cls = nn.ParameterList(nn.Parameter(torch.randn(1, 1, dim) * 0.02) for _ in patches[:extra * 2])
        self.class_token = class_token
        self.blocks, self.merges = nn.ModuleList(), nn.ModuleList()
        layered = isinstance(build, (VisionBuild, TwoBranchBuild))
        width, count, grid = dim, heads, self.grids[0]
        depths = _stage_depths(depth) if getattr(build, "hierarchical", False) else [depth]
        layer = 0
        for stage, stage_depth in enumerate(depths):
            if stage and all(n % 2 == 0 and n >= 4 for n in grid):
                self.merges.append(PatchMerging(width))
                width, count, grid = 2 * width, 2 * count, (grid[0] // 2, grid[1] // 2)
            else:
                self.merges.append(nn.Identity())
            stage_blocks = nn.ModuleList()
            for _ in range(stage_depth):
                if self.two_branch:
                    tokens = sum(1 + g[0] * g[1] for g in self.grids)
                    module = build(width, count, tokens, layer=layer, split=1 + grid[0] * grid[1])
                elif layered:
                    module = build(width, count, grid[0] * grid[1], layer=layer, grid=grid)
                else:
                    module = build(width, count, grid[0] * grid[1] + extra)
                stage_blocks.append(TransformerBlock(width, module, mlp_ratio, dropout))
                layer += 1
            self.blocks.append(stage_blocks)
        self.norm = nn.LayerNorm(width)
        self.classifiers = nn.ModuleList(nn.Linear(width, num_classes) for _ in patches)

    def forward(self, images: Tensor) -> Tensor:
        """``images`` ``(batch, in_channels, H, W)`` -> logits ``(batch, num_classes)``."""
        channels = self.embeds[0].in_channels
        if images.dim() != 4 or images.shape[1] != channels or tuple(images.shape[2:]) != self.image_size:
            raise ShapeError(f"VisionTransformer takes images (batch, {channels}, {self.image_size[0]}, "
                             f"{self.image_size[1]}), got {tuple(images.shape)}")
        branches = [embed(images).flatten(2).transpose(1, 2) for embed in self.embeds]
        if self.two_branch:
            branches = [torch.cat([cls.expand(len(images), -1, -1), x], dim=1) for cls, x in zip(self.cls, branches)]
        elif self.class_token == "post":
            branches = [torch.cat([branches[0], self.cls[0].expand(len(images), -1, -1)], dim=1)]
        x = torch.cat([b + pos for b, pos in zip(branches, self.positions)], dim=1)
        grid = self.grids[0]
        for merge, stage in zip(self.merges, self.blocks):
            if isinstance(merge, PatchMerging):
                x, grid = merge(x, grid), (grid[0] // 2, grid[1] // 2)
            for block in stage:
                x = block(x)
        x = self.norm(x)
        if self.two_branch:
            split = branches[0].shape[1]
            return (self.classifiers[0](x[:, 0]) + self.classifiers[1](x[:, split])) / 2
        return self.classifiers[0](x[:, -1] if self.class_token == "post" else x.mean(dim=1))
