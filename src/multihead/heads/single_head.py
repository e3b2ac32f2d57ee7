"""Single-head attention of SHViT (Yun & Ro, 2024, "SHViT: Single-Head Vision Transformer with
Memory Efficient Macro Design", arXiv 2401.16456; code ysj9909/SHViT)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from ..scores import as_score
from ..nn.attention import attend, check_inputs
from .base import Costs, core_flops


class SingleHeadAttention(Costs, nn.Module):
    """SHViT's single-head self-attention (SHSA): one head over a part of the channels.

    Against standard multi-head attention (all channels, split into heads) it attends with a single
    head over the first ``partial_dim`` channels only, and passes the other ``dim - partial_dim``
    channels through untouched; the two parts are concatenated and mixed by the output projection.
    As in the paper's code: the partial channels are normalised first (GroupNorm with one group, i.e.
    over those channels and all tokens of a sample), q and k have ``qk_dim`` channels (16 in every
    SHViT stage) and v the ``partial_dim`` ones, the scale is ``qk_dim ** -0.5``, and the projection
    is ReLU then a linear map ``dim -> dim``. The paper's 1x1 conv + BatchNorm layers are linear maps
    with bias here (the BatchNorm folds into them at inference). ``partial_dim`` defaults to
    ``dim // 4`` (SHViT's ``partial_dim / embed_dim = 1/4``); ``heads`` is accepted for the
    catalog's uniform signature and ignored (there is one head).

    Tokens are ``(batch, tokens, dim)`` with an image flattened row-major (a 2-D ``Neighborhood`` or
    any other pattern applies to them as usual); the residual and the block's convolutions and FFN
    are the caller's.
    """

    def __init__(self, dim: int, heads: int = 1, *, partial_dim: int | None = None, qk_dim: int = 16,
                 pattern=None, score=None, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ShapeError(f"dim must be a positive integer, got {dim!r}")
        partial_dim = max(1, dim // 4) if partial_dim is None else partial_dim
        if isinstance(partial_dim, bool) or not isinstance(partial_dim, int) or not 1 <= partial_dim <= dim:
            raise ShapeError(f"partial_dim must be an integer in [1, dim={dim}], got {partial_dim!r}")
        if isinstance(qk_dim, bool) or not isinstance(qk_dim, int) or qk_dim < 1:
            raise ShapeError(f"qk_dim must be a positive integer, got {qk_dim!r}")
        if not 0.0 <= dropout < 1.0:
            raise ShapeError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dim, self.heads, self.partial_dim, self.qk_dim = dim, 1, partial_dim, qk_dim
        self.pattern, self.dropout, self.backend = pattern, float(dropout), backend
        self.score = as_score(score)
        if self.score is not None:
            self.score.check(1)
        self.norm = nn.GroupNorm(1, partial_dim)
        self.qkv = nn.Linear(partial_dim, 2 * qk_dim + partial_dim)
        self.proj = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim))

    def cache_refusal(self) -> str:
        """SHViT cannot decode token by token."""
        return ("its GroupNorm normalises over all tokens of the sequence, so a new token changes the "
                "outputs of the earlier ones")

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None, need_weights: bool = False):
        check_inputs(x, None, self.dim)
        attended, passed = x.split([self.partial_dim, self.dim - self.partial_dim], dim=-1)
        normed = self.norm(attended.transpose(1, 2)).transpose(1, 2)
        q, k, v = self.qkv(normed).unsqueeze(1).split([self.qk_dim, self.qk_dim, self.partial_dim], dim=-1)
        out, weights = attend(self, q, k, v, key_padding_mask=key_padding_mask, need_weights=need_weights,
                              scale=self.qk_dim ** -0.5)
        y = self.proj(torch.cat([out.squeeze(1), passed], dim=-1))
        return (y, weights) if need_weights else y

    def attention_flops(self, seq_len: int) -> int:
        return core_flops(1, seq_len, seq_len, self.qk_dim, self.partial_dim)

    def kv_cache_elements(self) -> int:
        return self.qk_dim + self.partial_dim

    def cost_note(self, seq_len: int) -> str:
        return f"one head over {self.partial_dim} of {self.dim} channels, q/k width {self.qk_dim}"

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, partial_dim={self.partial_dim}, qk_dim={self.qk_dim}, "
                f"pattern={self.pattern!r}, backend={self.backend!r}")
