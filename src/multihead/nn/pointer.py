"""Pointer Networks (Vinyals, Fortunato & Jaitly, 2015, "Pointer Networks", arXiv 1506.03134).

Against standard attention, the attention weights are the output: at decoder step ``i`` the
distribution over the input positions ``p(C_i = j) = softmax_j(u_ij)`` picks an input element, so
the output "vocabulary" is the input, whatever its length. The paper scores with additive
attention, ``u_ij = v^T tanh(W_1 e_j + W_2 d_i)`` (``kind="additive"``); ``kind="dot"`` scores
``u_ij = (W d_i) . e_j`` (multiplicative). The scores enter ``multihead.attention`` as a per-pair
score term (``BlockBias`` with blocks of one key; for the dot form, as q and k), positions a step may
not point at (already chosen ones, padding) as a ``KeySelection``, and the reference backend returns
the weights: the pointer distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from ..functional import attention
from ..patterns import KeySelection
from ..scores.blocks import BlockBias


class PointerAttention(nn.Module):
    """The pointing head of a Pointer Network: ``forward(decoder, encoder, allowed=None)`` returns
    ``p`` ``(batch, steps, inputs)``, each row a distribution over the input positions (module
    docstring). ``allowed`` ``(batch, steps, inputs)`` bool marks where a step may point (every row
    needs one); ``log_probs`` gives ``log p`` for the training loss."""

    def __init__(self, dim: int, hidden: int | None = None, *, kind: str = "additive", kv_dim: int | None = None):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden if hidden is not None else dim),
                            ("kv_dim", kv_dim if kv_dim is not None else dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ShapeError(f"{name} must be a positive integer, got {value!r}")
        if kind not in ("additive", "dot"):
            raise ShapeError(f"kind must be 'additive' (the paper's) or 'dot', got {kind!r}")
        self.dim, self.kv_dim, self.kind = dim, kv_dim or dim, kind
        hidden = hidden or dim
        if kind == "additive":
            self.w_encoder = nn.Linear(self.kv_dim, hidden, bias=False)  # W_1
            self.w_decoder = nn.Linear(dim, hidden, bias=False)  # W_2
            self.v = nn.Linear(hidden, 1, bias=False)
        else:
            self.w = nn.Linear(dim, self.kv_dim, bias=False)

    def _pattern(self, allowed: Tensor | None, batch: int, steps: int, inputs: int, device):
        if allowed is None:
            return None
        if not isinstance(allowed, Tensor) or allowed.dtype != torch.bool or allowed.shape != (batch, steps, inputs):
            raise ShapeError(f"allowed must be a bool tensor (batch, steps, inputs) = {(batch, steps, inputs)}, "
                             f"got {getattr(allowed, 'dtype', type(allowed).__name__)} "
                             f"{tuple(getattr(allowed, 'shape', ()))}")
        if not allowed.any(-1).all():
            raise ShapeError("allowed leaves a step with no input to point at; allow at least one position per step")
        indices = torch.arange(inputs, device=device).expand(batch, 1, steps, inputs)
        return KeySelection(indices, allowed.unsqueeze(1).to(device), inputs)

    def forward(self, decoder: Tensor, encoder: Tensor, allowed: Tensor | None = None) -> Tensor:
        for name, t, width in (("decoder", decoder, self.dim), ("encoder", encoder, self.kv_dim)):
            if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != width:
                raise ShapeError(f"{name} must be (batch, tokens, {width}), got {getattr(t, 'shape', t)!r}")
        if decoder.shape[0] != encoder.shape[0]:
            raise ShapeError(f"decoder and encoder batch sizes differ: {decoder.shape[0]} vs {encoder.shape[0]}")
        batch, steps, inputs = decoder.shape[0], decoder.shape[1], encoder.shape[1]
        pattern = self._pattern(allowed, batch, steps, inputs, decoder.device)
        dummy = encoder.new_zeros(batch, 1, inputs, 1)
        if self.kind == "dot":
            q, k = self.w(decoder).unsqueeze(1), encoder.unsqueeze(1)
            _, p = attention(q, k, dummy, pattern=pattern, scale=1.0, backend="reference", return_weights=True)
            return p[:, 0]
        # u_ij = v . tanh(W_1 e_j + W_2 d_i), one score per pair
        u = self.v(torch.tanh(self.w_encoder(encoder).unsqueeze(1) + self.w_decoder(decoder).unsqueeze(2))).squeeze(-1)
        zeros_q = decoder.new_zeros(batch, 1, steps, 1)
        _, p = attention(zeros_q, dummy, dummy, pattern=pattern, score=BlockBias(u.unsqueeze(1), 1, inputs - steps),
                         scale=1.0, backend="reference", return_weights=True)
        return p[:, 0]

    def log_probs(self, decoder: Tensor, encoder: Tensor, allowed: Tensor | None = None) -> Tensor:
        """``log p``, for the negative log-likelihood of the pointed positions (disallowed ones are -inf,
        with zero gradient; probabilities are floored at the dtype's smallest normal number)."""
        p = self(decoder, encoder, allowed)
        floor = torch.finfo(p.dtype).tiny
        return torch.where(p > 0, p.clamp_min(floor).log(), torch.full_like(p, float("-inf")))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kv_dim={self.kv_dim}, kind={self.kind!r}"
