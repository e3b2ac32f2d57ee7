"""What every topology shares: ``Topology`` (``MultiHeadAttention`` split into overridable steps),
the attention call with key padding, and the cost methods.

A topology decides how per-head q, k, v are made from the input and how the head outputs are
combined; the attention itself always runs through ``multihead.attention``, so every pattern, score
and backend serves every topology that can be expressed as an attention call.

Cost conventions (used by ``attention_flops`` and ``kv_cache_bytes`` of every topology and by
``multihead list --costs``):

* attention FLOPs: ``2 x`` the multiply-adds of the two attention matmuls (``q . k`` and
  ``weights . v``) for one sequence of ``seq_len`` tokens attending to itself under the Full
  pattern, per batch element; projections excluded (the parameter count covers them). A pattern that
  keeps a fraction of the pairs scales this by that fraction.
* KV cache: the elements (and bytes, for a dtype) a decoder must keep per token and per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..nn import MultiHeadAttention


def core_flops(heads: int, q_len: int, kv_len: int, qk_dim: int, v_dim: int) -> int:
    """FLOPs of ``heads`` attention matmul pairs: ``2 x heads x q_len x kv_len x (qk_dim + v_dim)``."""
    return 2 * heads * q_len * kv_len * (qk_dim + v_dim)


class Costs:
    """The cost methods every topology provides (see the module docstring for the conventions)."""

    def attention_flops(self, seq_len: int) -> int:
        raise NotImplementedError

    def kv_cache_elements(self) -> int:
        """Elements a decoder caches per token (and per layer)."""
        raise NotImplementedError

    def kv_cache_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes a decoder caches per token (and per layer) in ``dtype``."""
        return self.kv_cache_elements() * torch.empty((), dtype=dtype).element_size()

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def cost_note(self, seq_len: int) -> str:
        """A line for the costs table: what the figures mean for this topology."""
        return ""


class Topology(Costs, MultiHeadAttention):
    """``MultiHeadAttention`` with cost methods: the base of the projection topologies, which
    override its steps (``project``, ``mix_qk``, ``attention_options``, ``combine``). With none
    overridden it is ``MultiHeadAttention``: same constructor, parameters and state dict."""

    def attention_flops(self, seq_len: int) -> int:
        return core_flops(self.heads, seq_len, seq_len, self.head_dim, self.head_dim)

    def kv_cache_elements(self) -> int:
        return 2 * self.kv_heads * self.head_dim


def costs_of(module, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """``{"params", "attention_flops", "kv_cache_bytes"}`` of a topology, or of a plain
    ``MultiHeadAttention`` (costed as the ``Topology`` it is equivalent to)."""
    costed = module if isinstance(module, Costs) else None
    if costed is None and isinstance(module, MultiHeadAttention):
        flops = Topology.attention_flops(module, seq_len)
        cache = Topology.kv_cache_elements(module) * torch.empty((), dtype=dtype).element_size()
        note = f"{module.kv_heads} key/value heads for {module.heads} query heads"
    elif costed is not None:
        flops, cache = costed.attention_flops(seq_len), costed.kv_cache_bytes(dtype)
        note = costed.cost_note(seq_len)
    else:
        raise TypeError(f"{type(module).__name__} is not a topology: it has no cost methods")
    return {"params": sum(p.numel() for p in module.parameters()), "attention_flops": int(flops),
            "kv_cache_bytes": int(cache), "note": note}
