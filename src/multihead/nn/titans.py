"""Titans' neural long-term memory and its memory-as-a-gate layer (Behrouz, Zhong & Mirrokni, 2024,
"Titans: Learning to Memorize at Test Time", arXiv 2501.00663).

Against attention, which keeps every past key and value, the **neural memory** is a small network
``M`` (per head: a ``d x d`` matrix, or a two-layer MLP) whose weights are trained *while the model
reads*: token ``t`` is an associative-memory example ``k_t -> v_t`` and the memory takes a gradient
step with momentum ("surprise") and forgetting,

    loss_t = || M_{t-1}(k_t) - v_t ||^2
    S_t = eta_t S_{t-1} - theta_t grad loss_t          (past surprise decays by eta_t)
    M_t = (1 - alpha_t) M_{t-1} + S_t                   (alpha_t forgets)
    y_t = M_t(q_t)                                      (read without updating)

with ``q, k, v`` linear projections (``q`` and ``k`` L2-normalised per head) and ``alpha, eta, theta``
from the token (sigmoids of a linear map, starting near 0.02, 0.11 and half their bounds). Two bounds
keep the test-time descent stable while the gates train: ``eta <= max_momentum`` (0.9) and ``theta <=
max_step / chunk`` (``max_step`` 0.05), so a chunk's steps, all taken from its starting memory, add up
to at most ``max_step`` (unbounded, a model trained on selective copying diverged to NaN; with
``max_step`` 0.1, the MLP memory at its bounds still diverged on random inputs of scale 3).

Training runs the paper's chunked form: inside a chunk of ``chunk`` tokens every gradient is taken at
the memory of the chunk's start (mini-batch gradient descent; ``chunk=1`` is the token-by-token
recurrence), and the two linear recurrences are lower-triangular products over the chunk. The initial
memory is learned.

``TitansGatedAttention`` is the MAG variant: learned persistent tokens are prepended, a sliding-window
causal attention (one ``multihead.attention`` call, ``Sinks(SlidingWindow(window, 0), persistent)``) and
the memory read the same sequence, and the output is ``RMSNorm(attention) * sigmoid(RMSNorm(memory))``
projected. Not built: the depthwise convolutions after the projections, the MAC and MAL variants.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from ..errors import ShapeError
from ..patterns import Sinks, SlidingWindow
from .attention import MultiHeadAttention, check_inputs, merge_heads, split_heads


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapeError(f"{name} must be a positive integer, got {value!r}")
    return value


def memory_read(params: tuple[Tensor, ...], keys: Tensor) -> Tensor:
    """``M(keys)`` for memory weights ``params``: one matrix ``k W``, or ``silu(k W1) W2``; the weights
    may carry leading (batch, head, token) dimensions matching ``keys`` ``(..., d)``."""
    if len(params) == 1:
        return torch.einsum("...d,...de->...e", keys, params[0])
    hidden = F.silu(torch.einsum("...d,...dh->...h", keys, params[0]))
    return torch.einsum("...h,...he->...e", hidden, params[1])


def _loss(params: tuple[Tensor, ...], key: Tensor, value: Tensor) -> Tensor:
    return (memory_read(params, key) - value).square().sum()


def decay_products(log_keep: Tensor) -> Tensor:
    """``(..., c, c)`` lower-triangular ``A[i, j] = prod_{l=j+1..i} keep_l`` from ``log keep`` ``(..., c)``:
    the weights of ``s_i = keep_i s_{i-1} + u_i`` unrolled over a chunk."""
    total = log_keep.cumsum(-1)
    gaps = total.unsqueeze(-1) - total.unsqueeze(-2)
    lower = torch.ones(log_keep.shape[-1], log_keep.shape[-1], dtype=torch.bool, device=log_keep.device).tril()
    return torch.where(lower, gaps, torch.full_like(gaps, float("-inf"))).exp()


class NeuralMemory(nn.Module):
    """Titans' neural long-term memory (module docstring) on ``(batch, tokens, dim)``: per head a memory of
    ``layers`` (1: a matrix, 2: an MLP of width ``hidden``) updated in chunks of ``chunk`` tokens, step
    sizes up to ``max_step / chunk`` and momentum up to ``max_momentum``; returns the reads ``y_t``
    projected back to ``dim``."""

    causal = True

    def __init__(self, dim: int, heads: int, *, layers: int = 2, hidden: int | None = None, chunk: int = 16,
                 max_step: float = 0.05, max_momentum: float = 0.9):
        super().__init__()
        if isinstance(max_step, bool) or not isinstance(max_step, (int, float)) or not 0 < max_step <= 1:
            raise ShapeError(f"NeuralMemory.max_step must be in (0, 1], got {max_step!r}")
        if isinstance(max_momentum, bool) or not isinstance(max_momentum, (int, float)) or not 0 < max_momentum < 1:
            raise ShapeError(f"NeuralMemory.max_momentum must be in (0, 1), got {max_momentum!r}")
        self.max_step, self.max_momentum = float(max_step), float(max_momentum)
        self.dim, self.heads, self.chunk = _positive("dim", dim), _positive("heads", heads), _positive("chunk", chunk)
        if dim % heads:
            raise ShapeError(f"NeuralMemory: heads ({heads}) must divide dim ({dim})")
        if layers not in (1, 2):
            raise ShapeError(f"NeuralMemory.layers must be 1 (a matrix) or 2 (an MLP), got {layers!r}")
        d = dim // heads
        hidden = _positive("hidden", 2 * d if hidden is None else hidden)
        self.layers, self.head_dim = layers, d
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.gates = nn.Linear(dim, 3 * heads)  # alpha (forget), eta (momentum), theta (step size)
        # start remembering, with little momentum: alpha ~ 0.02, eta ~ 0.11, theta ~ half its bound (a larger
        # eta made the chunked descent diverge on 1024 random tokens: the chunk's stale gradients pile up)
        with torch.no_grad():
            self.gates.bias.copy_(torch.tensor([-4.0, -2.0, 0.0]).repeat_interleave(heads))
        shapes = [(d, d)] if layers == 1 else [(d, hidden), (hidden, d)]
        self.initial = nn.ParameterList(nn.Parameter(torch.randn(heads, *s) / s[0] ** 0.5) for s in shapes)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per head ``q, k, v`` ``(B, heads, T, d)`` and ``alpha, eta, theta`` ``(B, heads, T)``."""
        q = F.normalize(split_heads(self.q_proj(x), self.heads), dim=-1)
        k = F.normalize(split_heads(self.k_proj(x), self.heads), dim=-1)
        v = split_heads(self.v_proj(x), self.heads)
        alpha, eta, theta = torch.sigmoid(self.gates(x)).transpose(1, 2).chunk(3, dim=1)
        return q, k, v, alpha, self.max_momentum * eta, self.max_step / self.chunk * theta

    def log_keeps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``log(1 - alpha)`` and ``log(eta)`` ``(B, heads, T)``, finite however saturated the gates."""
        forget, momentum, _ = self.gates(x).transpose(1, 2).chunk(3, dim=1)
        return F.logsigmoid(-forget), F.logsigmoid(momentum) + math.log(self.max_momentum)

    def forward(self, x: Tensor) -> Tensor:
        check_inputs(x, None, self.dim)
        q, k, v, _, _, theta = self.inputs(x)
        log_keep, log_eta = self.log_keeps(x)
        batch, tokens = x.shape[0], x.shape[1]
        params = tuple(p.to(x.dtype).expand(batch, *p.shape) for p in self.initial)
        surprise = tuple(torch.zeros_like(p) for p in params)
        per_token_grad = vmap(vmap(vmap(grad(_loss), in_dims=(None, 0, 0)), in_dims=(0, 0, 0)), in_dims=(0, 0, 0))
        reads = []
        for start in range(0, tokens, self.chunk):
            span = slice(start, min(start + self.chunk, tokens))
            grads = per_token_grad(params, k[:, :, span], v[:, :, span])  # at the chunk's starting memory
            momentum = decay_products(log_eta[:, :, span])  # (B, h, c, c)
            keep = decay_products(log_keep[:, :, span])
            first_eta = log_eta[:, :, span].cumsum(-1).exp()  # prod_{l<=i} eta_l: S_0's weight at i
            first_keep = log_keep[:, :, span].cumsum(-1).exp()
            updated, carried = [], []
            for p, s, g in zip(params, surprise, grads):
                shape = p.shape[2:]
                steps = -theta[:, :, span].unsqueeze(-1) * g.flatten(3)  # (B, h, c, P)
                s_all = momentum @ steps + first_eta.unsqueeze(-1) * s.flatten(2).unsqueeze(2)
                p_all = keep @ s_all + first_keep.unsqueeze(-1) * p.flatten(2).unsqueeze(2)
                updated.append(p_all.view(*p_all.shape[:3], *shape))
                carried.append(s_all[:, :, -1].view(s.shape))
            reads.append(memory_read(tuple(updated), q[:, :, span]))
            params, surprise = tuple(u[:, :, -1] for u in updated), tuple(carried)
        return self.out_proj(merge_heads(torch.cat(reads, 2)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, layers={self.layers}, chunk={self.chunk}, "
                f"max_step={self.max_step}, max_momentum={self.max_momentum}")


class TitansGatedAttention(nn.Module):
    """Titans' memory as a gate (MAG; module docstring) on ``(batch, tokens, dim)``: ``persistent``
    learned tokens, a causal window of ``window`` earlier tokens, the neural memory, gated."""

    causal = True

    def __init__(self, dim: int, heads: int, *, window: int = 64, persistent: int = 4, chunk: int = 16,
                 memory_layers: int = 2, backend: str = "auto"):
        super().__init__()
        self.dim, self.window = _positive("dim", dim), _positive("window", window)
        self.count = _positive("persistent", persistent)
        self.persistent = nn.Parameter(torch.randn(persistent, dim) * 0.02)
        self.attention = MultiHeadAttention(dim, heads, pattern=Sinks(SlidingWindow(window, 0), persistent),
                                            backend=backend)
        self.memory = NeuralMemory(dim, heads, layers=memory_layers, chunk=chunk)
        self.attention_norm, self.memory_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        check_inputs(x, None, self.dim)
        extended = torch.cat([self.persistent.to(x.dtype).expand(x.shape[0], -1, -1), x], 1)
        y = self.attention(extended)[:, self.count:]
        m = self.memory(extended)[:, self.count:]
        return self.out_proj(self.attention_norm(y) * torch.sigmoid(self.memory_norm(m)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window={self.window}, persistent={self.count}"
