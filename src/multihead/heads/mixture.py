"""Mixture-of-Head attention (MoH; Jin, Zhu, Yuan & Yan, 2024, arXiv 2410.11842)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from ..nn import MultiHeadAttention
from .base import Topology, core_flops
from .grouped import constructor_options, copy_projections


class MixtureOfHeads(Topology):
    """Mixture-of-Head attention: heads are experts, a per-token router picks and weights them.

    Against standard multi-head attention it changes how head outputs are combined: instead of the
    plain sum ``sum_h W_O^h o_h`` (concatenate, project), token ``t`` gets ``sum_h g_{t,h} W_O^h o_h``
    with router weights ``g``. The first ``shared_heads`` heads are always on; of the other
    ``heads - shared_heads`` ("routed") heads each token keeps its ``top_k`` best. The paper's
    two-stage routing (as in its released code, SkyworkAI/MoH):

    * routed: ``p = softmax(W_r x_t)`` over the routed heads; keep the top ``top_k``; renormalise the
      kept ones to sum to 1 and multiply by ``top_k``;
    * shared: ``softmax(W_s x_t) * shared_heads`` over the shared heads (all ones when there is one);
    * balance: ``[a_1, a_2] = 2 softmax(W_h x_t)`` scales shared and routed weights (only when both
      kinds exist).

    So with uniform router outputs every active head gets weight 1: with ``top_k`` equal to the
    number of routed heads and equal weights, MoH *is* multi-head attention (``from_mha`` starts
    there: its routers are zero). The load-balance loss (the paper's ``L_b``, as in its code)
    ``E * sum_i f_i P_i`` over the ``E`` routed heads, ``f_i`` the fraction of tokens that picked
    head ``i`` and ``P_i`` its mean router probability, equals ``top_k`` when perfectly balanced.

    After every forward the module holds: ``aux_loss`` (that loss, a scalar tensor in the graph: add
    ``coef * module.aux_loss`` to the training loss; zero without routed heads), ``active_fraction``
    (the fraction of (token, head) pairs with a non-zero weight, ``(shared_heads + top_k) / heads``)
    and ``head_usage`` (per head, the fraction of tokens that used it), all over every token of the
    call, padding included. Every head is computed
    densely and the inactive ones are multiplied by 0: the compute saving of the paper needs a
    kernel that skips inactive (token, head) pairs, which ``active_attention_flops`` counts.

    Args (beyond ``MultiHeadAttention``'s): ``shared_heads`` (default ``heads // 4``), ``top_k``
    routed heads active per token (default: 75% of the heads active in all, at least 1 routed).
    """

    decodes_with_cache = True  # the router weights each token's own heads

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, *, shared_heads: int | None = None,
                 top_k: int | None = None, **options):
        super().__init__(dim, heads, kv_heads, **options)
        shared = heads // 4 if shared_heads is None else shared_heads
        if isinstance(shared, bool) or not isinstance(shared, int) or not 0 <= shared <= heads:
            raise ShapeError(f"shared_heads must be an integer in [0, heads={heads}], got {shared_heads!r}")
        routed = heads - shared
        if top_k is None:
            top_k = min(routed, max(1, round(0.75 * heads) - shared)) if routed else 0
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not (1 if routed else 0) <= top_k <= routed:
            raise ShapeError(f"top_k must be an integer in [1, routed heads={routed}] "
                             f"(heads - shared_heads), got {top_k!r}")
        self.shared_heads, self.routed_heads, self.top_k = shared, routed, top_k
        self.router = nn.Linear(dim, routed, bias=False) if routed else None
        self.shared_router = nn.Linear(dim, shared, bias=False) if shared > 1 else None
        self.balance = nn.Linear(dim, 2, bias=False) if shared and routed else None
        self.aux_loss: Tensor | None = None
        self.head_usage: Tensor | None = None

    @property
    def active_fraction(self) -> float | None:
        """Fraction of (token, head) pairs active in the last call (None before the first)."""
        return None if self.head_usage is None else self.head_usage.mean().item()

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Router weights ``(B, L, heads)`` for tokens ``x`` and the load-balance loss."""
        aux = x.new_zeros(())
        shared = routed = None
        if self.shared_heads:
            if self.shared_router is not None:
                shared = torch.softmax(self.shared_router(x), dim=-1) * self.shared_heads
            else:
                shared = x.new_ones(*x.shape[:-1], 1)
        if self.routed_heads:
            probs = torch.softmax(self.router(x), dim=-1)
            chosen = torch.zeros_like(probs).scatter_(-1, probs.topk(self.top_k, dim=-1).indices, 1.0)
            kept = probs * chosen
            routed = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).eps) * self.top_k
            frequency, mean_prob = chosen.flatten(0, -2).mean(0), probs.flatten(0, -2).mean(0)
            aux = self.routed_heads * (frequency * mean_prob).sum()
        if self.balance is not None:
            alpha = torch.softmax(self.balance(x), dim=-1) * 2
            shared, routed = shared * alpha[..., :1], routed * alpha[..., 1:]
        parts = [p for p in (shared, routed) if p is not None]
        return torch.cat(parts, dim=-1), aux

    def combine(self, out: Tensor, x: Tensor) -> Tensor:
        gates, self.aux_loss = self.gates(x)
        self.head_usage = (gates != 0).detach().flatten(0, -2).float().mean(0)
        weighted = out * gates.transpose(1, 2).unsqueeze(-1).to(out.dtype)  # (B, H, L, D) x (B, H, L, 1)
        return super().combine(weighted, x)

    def active_attention_flops(self, seq_len: int) -> int:
        """Attention FLOPs of a kernel that skips inactive (query token, head) pairs."""
        active = self.shared_heads + self.top_k
        return core_flops(active, seq_len, seq_len, self.head_dim, self.head_dim)

    def cost_note(self, seq_len: int) -> str:
        active = self.shared_heads + self.top_k
        return (f"{self.shared_heads} shared + {self.top_k} of {self.routed_heads} routed heads active; all "
                f"computed here, {self.active_attention_flops(seq_len) / 1e9:.3f} GFLOPs if inactive heads "
                f"were skipped ({active}/{self.heads})")

    @classmethod
    def from_mha(cls, module: MultiHeadAttention, *, shared_heads: int | None = None, top_k: int | None = None,
                 **overrides) -> "MixtureOfHeads":
        """A MoH with ``module``'s projections (the paper continue-tunes a pretrained MHA model, e.g.
        LLaMA3-8B, into MoH). The routers start at zero, so every router weight is uniform: with
        ``top_k = heads - shared_heads`` the result computes exactly what ``module`` does, and fewer
        active heads start from that same model with heads dropped."""
        if not isinstance(module, MultiHeadAttention):
            raise ShapeError(f"from_mha takes a MultiHeadAttention, got {type(module).__name__}")
        options = {**constructor_options(module), **overrides}
        new = cls(module.dim, module.heads, module.kv_heads, shared_heads=shared_heads, top_k=top_k,
                  **options).to(module.q_proj.weight)
        copy_projections(module, new)
        with torch.no_grad():
            for router in (new.router, new.shared_router, new.balance):
                if router is not None:
                    router.weight.zero_()
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared_heads={self.shared_heads}, top_k={self.top_k}"
