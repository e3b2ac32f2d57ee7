"""Selective Multi-Head Attention (SMHA) of Union of Experts (Yang et al., 2025, "Union of Experts:
Adapting Hierarchical Routing to Equivalently Decomposed Transformer", arXiv 2503.02495), after the
authors' latest released version, ``SMHA_v3.py`` (YujiaoYang-work/UoE,
``language_modeling/model/attention/SMHA_v3.py``, commit 9de0cf25).

Against multi-head attention, where every head reads every token, each head is an expert that sees
only the tokens that chose it: a router (``softmax(W_g x)`` over the heads) lets every token pick its
``top_k`` best heads (``heads // 2``, the authors'); each head then attends **only among its own
tokens** - gathered in their order, causal in that order when the module is causal, with RoPE (when
``position`` is given) at their ranks inside the head's subset, not at their positions in the
sequence - and its projected output (``W_o`` slice plus a per-head bias) is added back only at those
tokens. A token's output is the sum of the heads it chose; a head's cost falls with the share of the
tokens that choose it. As in the released code the router only selects: its scores do not weight the
outputs, so it receives no gradient; its parameters are created frozen (``requires_grad=False``) and keep
their initialisation unless set or trained by other means.

How it runs: per head, the chosen tokens are gathered into a compact sequence padded to the longest
one in the batch, one ``multihead.attention`` call runs on the ``(batch x heads)`` compact sequences
(``Causal`` there, or ``KeyPadding`` of the padded slots when bidirectional), and the outputs are
scattered back. Where a head has fewer tokens than the longest, the released code fills its sequence
with unchosen tokens (whichever ``torch.topk`` returns among equal zero scores), which then act as keys
and write outputs; here the filler slots are masked out instead (a choice: the code's filler is not
determined by the input), so the two agree whenever every head has as many tokens as the longest.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from ..functional import attention
from ..nn.attention import check_inputs, merge_heads, split_heads
from ..patterns import Causal, KeyPadding
from .base import Topology, core_flops


class SelectiveMultiHeadAttention(Topology):
    """SMHA (module docstring) on ``(batch, tokens, dim)``: every token picks ``top_k`` of the ``heads``
    by a router; each head attends among its tokens only. ``pattern`` may be None (bidirectional) or
    causal (``Causal()``, what ``multihead.models.make_causal`` gives); ``position`` (e.g.
    ``RoPE(head_dim)``) rotates q and k at their ranks within each head's tokens. Other options as
    ``MultiHeadAttention`` (``kv_heads`` must equal ``heads``; no score)."""

    decodes_with_cache = False

    def __init__(self, dim: int, heads: int, *, top_k: int | None = None, **options):
        for name in ("score", "context_parallel", "kv_dim"):
            if options.get(name) is not None:
                raise ShapeError(f"SelectiveMultiHeadAttention does not take {name}=: each head attends in its own "
                                 f"compacted token order")
        super().__init__(dim, heads, **options)
        if self.kv_heads != heads:
            raise ShapeError(f"SelectiveMultiHeadAttention routes tokens to whole heads: kv_heads must equal heads, "
                             f"got {self.kv_heads}")
        top_k = max(heads // 2, 1) if top_k is None else top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= heads:
            raise ShapeError(f"top_k must be an integer in [1, heads={heads}], got {top_k!r}")
        self.top_k = top_k
        self.router = nn.Linear(dim, heads)
        self.router.requires_grad_(False)  # it only selects: the output gives it no gradient (as released)
        has_bias = self.out_proj.bias is not None
        self.out_proj = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.head_bias = nn.Parameter(torch.zeros(heads, dim)) if has_bias else None

    def cache_refusal(self) -> str | None:
        return "each head attends in the compacted order of the tokens routed to it; decoding is not built"

    def choices(self, x: Tensor) -> Tensor:
        """``(batch, tokens, heads)``: True where the token chose the head (its ``top_k`` router scores)."""
        scores = torch.softmax(self.router(x), dim=-1)
        chosen = scores.topk(self.top_k, dim=-1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)

    def _causal(self, tokens: int, device) -> bool:
        if self.pattern is None:
            return False
        mask = self.pattern.dense_mask(tokens, tokens, device=device)
        if mask.dim() != 4 or mask.shape[:2] != (1, 1):
            mask = None  # batch- or head-dependent: neither full nor causal
        elif bool(mask.all()):
            return False
        if mask is not None and torch.equal(mask[0, 0], torch.ones(tokens, tokens, dtype=torch.bool,
                                                                   device=device).tril()):
            return True
        raise ShapeError(f"SelectiveMultiHeadAttention serves full or causal attention (in each head's token order), "
                         f"not the pattern {self.pattern!r}")

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                need_weights: bool = False, cu_seqlens=None, cache=None):
        if context is not None or key_padding_mask is not None or need_weights or cu_seqlens is not None \
                or cache is not None:
            raise ShapeError("SelectiveMultiHeadAttention is self-attention over x alone (no context, "
                             "key_padding_mask, need_weights, cu_seqlens or cache)")
        check_inputs(x, None, self.dim)
        batch, tokens, _ = x.shape
        causal = self._causal(tokens, x.device)
        member = self.choices(x).transpose(1, 2)  # (B, H, N)
        counts = member.sum(-1)
        length = max(int(counts.max()), 1)
        position = torch.arange(tokens, device=x.device)
        order = torch.argsort(torch.where(member, position, position + tokens), dim=-1)[..., :length]  # (B, H, L)
        valid = torch.arange(length, device=x.device) < counts.unsqueeze(-1)
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        index = order.unsqueeze(-1).expand(-1, -1, -1, self.head_dim)
        q, k, v = (t.gather(2, index) for t in (q, k, v))
        if self.position is not None:
            q, k = self.position(q, k)  # ranks 0 .. L-1 within each head's tokens
        fold = (batch * self.heads, 1, length, self.head_dim)
        if causal:
            pattern = Causal()  # a chosen token's earlier slots are all chosen tokens
        else:
            pattern = KeyPadding((~(valid | (torch.arange(length, device=x.device) == 0))).reshape(-1, length))
        out = attention(q.reshape(fold), k.reshape(fold), v.reshape(fold), pattern=pattern,
                        normalizer=self.normalizer, backend=self.backend,
                        dropout=self.dropout if self.training else 0.0)
        out = out.view(batch, self.heads, length, self.head_dim) * valid.unsqueeze(-1)
        out = torch.zeros_like(q[:, :, :1]).expand(-1, -1, tokens, -1).scatter_add(2, index, out)
        y = self.out_proj(merge_heads(out))
        if self.head_bias is not None:
            y = y + member.transpose(1, 2).to(y.dtype) @ self.head_bias
        return y

    def attention_flops(self, seq_len: int) -> int:
        chosen = -(-seq_len * self.top_k // self.heads)
        return core_flops(self.heads, chosen, chosen, self.head_dim, self.head_dim)

    def cost_note(self, seq_len: int) -> str:
        return (f"each head over the {self.top_k}/{self.heads} of the tokens that chose it (balanced routing); "
                f"FLOPs x ({self.top_k}/{self.heads})^2")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", top_k={self.top_k}"
