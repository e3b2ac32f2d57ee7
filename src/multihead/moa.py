"""MoA, Mixture of Sparse Attention (Fu et al., 2024, "MoA: Mixture of Sparse Attention for Automatic
Large Language Model Compression", arXiv 2406.14909): a causal sliding window per head and per layer,
each with its own elastic span ``S = alpha + beta * N`` (``N`` the sequence length), found by profiling
the model on calibration batches.

Against standard causal attention, head ``h`` of layer ``l`` sees only its last ``S_{l,h}`` keys. The
search (``search``) has two steps:

1. ``profile``: the first-order influence of every attention value on the loss. Masking entry
   ``(i, j)`` of a softmax row (and renormalising the row) changes the loss by about
   ``-A_ij (dL/dA_ij - sum_k A_ik dL/dA_ik)``; MoA sums such influences over the entries a candidate
   span drops. Here each entry costs the magnitude of its influence (dropping an entry never counts
   as a gain), summed over the rows and the calibration batches: ``cost[l][h, c]`` for candidate
   ``c``. The gradients ``dL/dA`` come from a head hook that reruns each layer's attention on the
   reference backend with its weights as a leaf (so any pattern and score of the layer apply).
2. ``choose``: one candidate per head minimising the summed cost under a budget on the mean span
   over all heads and layers (a multiple-choice knapsack, solved by a Lagrangian sweep: each head
   takes ``argmin cost + lambda * span``, ``lambda`` as small as the budget allows).

The result, a ``MoAConfig``, gives each layer a ``PerHead`` pattern of causal windows for any length
(``patterns``) and ``apply`` sets them on the model's attention modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .analysis.layers import add_head_hook, select_layers
from .errors import ShapeError
from .functional import attention
from .patterns import Causal, PerHead, SlidingWindow


@dataclass(frozen=True)
class Span:
    """An elastic causal window: ``max(1, min(N, round(alpha + beta * N)))`` keys at length ``N``."""

    alpha: float
    beta: float = 0.0

    def __post_init__(self):
        if self.alpha < 0 or self.beta < 0 or (self.alpha == 0 and self.beta == 0):
            raise ShapeError(f"Span needs alpha, beta >= 0 and not both 0, got {self.alpha}, {self.beta}")

    def keys(self, length: int) -> int:
        return max(1, min(length, round(self.alpha + self.beta * length)))

    def pattern(self, length: int):
        return SlidingWindow(self.keys(length) - 1, 0) & Causal()


def influence(weights: Tensor, grad: Tensor) -> Tensor:
    """Per entry, the first-order loss change of masking it and renormalising its row:
    ``-A_ij (g_ij - sum_k A_ik g_ik)``, from weights ``A`` and their gradient ``g`` (same shape)."""
    if weights.shape != grad.shape:
        raise ShapeError(f"weights {tuple(weights.shape)} and grad {tuple(grad.shape)} must have one shape")
    mean = (weights * grad).sum(-1, keepdim=True)
    return -weights * (grad - mean)


def window_costs(entry_cost: Tensor, spans: Sequence[Span]) -> Tensor:
    """``(heads, candidates)``: per head, the summed ``entry_cost`` ``(B, H, Lq, Lk)`` of the entries each
    candidate span drops (keys more than ``span - 1`` before the query; queries aligned with the last
    keys)."""
    q_len, kv_len = entry_cost.shape[-2:]
    rows = torch.arange(q_len, device=entry_cost.device) + kv_len - q_len
    distance = rows[:, None] - torch.arange(kv_len, device=entry_cost.device)  # >= 0 for earlier keys
    per_distance = torch.zeros(entry_cost.shape[1], kv_len, dtype=entry_cost.dtype, device=entry_cost.device)
    d = distance.clamp(min=0).expand_as(entry_cost)
    kept = (distance >= 0).expand_as(entry_cost)
    per_distance.scatter_add_(1, (d * kept).transpose(0, 1).flatten(1),
                              (entry_cost * kept).transpose(0, 1).flatten(1))
    # a span of S keys keeps distances 0 .. S - 1 and drops the rest
    tail = per_distance.flip(-1).cumsum(-1).flip(-1)  # tail[:, s] = cost at distances >= s
    tail = torch.cat([tail, tail.new_zeros(tail.shape[0], 1)], -1)
    return torch.stack([tail[:, min(s.keys(kv_len), kv_len)] for s in spans], -1)


class _Profiler:
    """Head hook: reruns the layer's attention with its weights as a leaf and records them."""

    def __init__(self):
        self.leaves: list[Tensor] = []

    def __call__(self, module, call, out):
        q, k, v = call.q.detach(), call.k.detach(), call.v
        with torch.no_grad():
            _, weights = attention(q, k, v[..., :1].detach(), **call.options, backend="reference",
                                   return_weights=True)
        leaf = weights.detach().requires_grad_()
        self.leaves.append(leaf)
        values = v.repeat_interleave(q.shape[1] // v.shape[1], 1) if v.shape[1] != q.shape[1] else v
        return torch.matmul(leaf.to(values.dtype), values)


def profile(model: nn.Module, loss_fn: Callable[[nn.Module, object], Tensor], batches: Iterable,
            spans: Sequence[Span], layers=None) -> dict[str, Tensor]:
    """``{layer name: cost (heads, candidates)}``: for every attention layer (or those named by
    ``layers``) and candidate span, the summed magnitude of the first-order loss change of the entries
    the span would drop, over ``batches`` (``loss_fn(model, batch)`` returns the loss)."""
    if not spans:
        raise ShapeError("spans must list at least one candidate Span")
    chosen = select_layers(model, layers)
    profilers = {name: _Profiler() for name in chosen}
    handles = [add_head_hook(m, profilers[name]) for name, m in chosen.items()]
    costs: dict[str, Tensor] = {}
    try:
        for batch in batches:
            for p in profilers.values():
                p.leaves.clear()
            loss = loss_fn(model, batch)
            leaves = [leaf for p in profilers.values() for leaf in p.leaves]
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            it = iter(grads)
            for name, p in profilers.items():
                for leaf in p.leaves:
                    g = next(it)
                    g = torch.zeros_like(leaf) if g is None else g
                    cost = window_costs(influence(leaf.detach(), g).abs(), spans)
                    costs[name] = costs[name] + cost if name in costs else cost
    finally:
        for handle in handles:
            handle.remove()
    if not costs:
        raise ShapeError("profile saw no attention call: pass at least one batch that runs the layers")
    return costs


@dataclass(frozen=True)
class MoAConfig:
    """One elastic span per head per layer: ``spans[layer name][head]``."""

    spans: dict[str, tuple[Span, ...]]

    def patterns(self, length: int) -> dict[str, PerHead]:
        """Per layer, the ``PerHead`` causal windows at sequence length ``length``."""
        return {name: PerHead([s.pattern(length) for s in heads]) for name, heads in self.spans.items()}

    def mean_keys(self, length: int) -> float:
        """Mean span over every head of every layer at ``length``."""
        counts = [s.keys(length) for heads in self.spans.values() for s in heads]
        return sum(counts) / len(counts)

    def apply(self, model: nn.Module, length: int) -> None:
        """Set each profiled layer's pattern to its heads' windows at ``length`` (its own pattern, if
        any, is replaced)."""
        layers = select_layers(model, list(self.spans))
        for name, pattern in self.patterns(length).items():
            layers[name].pattern = pattern


def choose(costs: dict[str, Tensor], spans: Sequence[Span], length: int, budget: float) -> MoAConfig:
    """One candidate per head minimising the total cost with the mean span (keys at ``length``) at most
    ``budget``, by a Lagrangian sweep (exact at the sweep's points; a head never takes a candidate
    that costs more and spans more than another)."""
    sizes = torch.tensor([float(s.keys(length)) for s in spans])
    if budget < float(sizes.min()):
        raise ShapeError(f"budget {budget} is below the smallest candidate span ({int(sizes.min())} keys at "
                         f"length {length}); raise it or add a smaller Span")
    names = list(costs)
    table = torch.cat([costs[n].detach().double().cpu() for n in names])  # (all heads, candidates)
    scale = float(table.abs().max()) or 1.0

    def pick(lam: float) -> Tensor:
        return (table / scale + lam * sizes.double()).argmin(-1)

    lo, hi = 0.0, 1.0
    while float(sizes[pick(hi)].mean()) > budget:
        hi *= 2
        if hi > 1e12:
            break
    for _ in range(60):  # the smallest lambda that meets the budget
        mid = (lo + hi) / 2
        if float(sizes[pick(mid)].mean()) > budget:
            lo = mid
        else:
            hi = mid
    picked = pick(hi).tolist()
    out, start = {}, 0
    for n in names:
        heads = costs[n].shape[0]
        out[n] = tuple(spans[c] for c in picked[start:start + heads])
        start += heads
    return MoAConfig(out)


def search(model: nn.Module, loss_fn: Callable[[nn.Module, object], Tensor], batches: Iterable,
           spans: Sequence[Span], length: int, budget: float, layers=None) -> MoAConfig:
    """Profile ``model`` on ``batches`` and choose a span per head under a mean-span ``budget`` (keys at
    ``length``); see the module docstring."""
    return choose(profile(model, loss_fn, batches, spans, layers), spans, length, budget)
