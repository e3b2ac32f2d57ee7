"""Linear attention with a feature map (Katharopoulos et al., 2020; SLAB's ReLU form, Guo et al., 2024)."""

from __future__ import annotations

from torch import Tensor

from .base import RecurrentAttention
from .engine import chunked_linear_attention, recurrent_linear_attention
from .feature_maps import feature_map as lookup_feature_map


class LinearAttention(RecurrentAttention):
    """Linear attention: ``softmax(q k^T) v`` replaced by ``phi(q) (phi(k)^T v)``.

    Against standard attention there is no softmax: the weight of key ``j`` for query ``i`` is
    ``phi(q_i) . phi(k_j)``, divided by ``phi(q_i) . sum_j phi(k_j)`` when ``normalize`` (the
    row sum, so weights still sum to 1), and the sum over keys is carried as a ``(head_dim,
    head_dim)`` state, so time and memory are linear in the tokens. ``feature_map``: ``"elu+1"``
    ("Transformers are RNNs", Katharopoulos et al., 2020), ``"relu"`` (SLAB's simplified linear
    attention, Guo et al., 2024; its depthwise convolution on v is not included), ``"silu"`` or
    ``"identity"``. ``causal=False`` lets every token read its whole sequence. No scale is applied
    (with ``normalize`` it would cancel).

    Constructor and call as ``RecurrentAttention`` (``dim, heads, kv_heads, head_dim, position,
    bias, form, chunk_size``; ``cu_seqlens``, ``initial_state``, ``return_state``).
    """

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None, *,
                 feature_map: str = "elu+1", causal: bool = True, normalize: bool = True, eps: float = 1e-6,
                 **options):
        super().__init__(dim, heads, kv_heads, head_dim, **options)
        self.feature_map_name, self.phi = feature_map, lookup_feature_map(feature_map)
        self.causal, self.normalize, self.eps = bool(causal), bool(normalize), float(eps)

    def mix(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens, initial_state):
        return self.run_form(chunked_linear_attention, recurrent_linear_attention, q, k, v, feature_map=self.phi,
                             causal=self.causal, normalize=self.normalize, cu_seqlens=cu_seqlens,
                             initial_state=initial_state, eps=self.eps)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", feature_map={self.feature_map_name!r}, causal={self.causal}, "
                f"normalize={self.normalize}")
