"""Cross-attention against input saliency ("Cross-Attention is Half Explanation", speech-to-text,
2023 seed): how far the attention weights of a cross-attention layer agree with a feature-attribution
map of which source tokens each output actually depends on.

- ``input_saliency(fn, source, score=None)``: gradient x input. For every output position ``t`` of
  ``fn(source)`` ``(batch, T, D)``, the relevance of source token ``s`` is
  ``|sum_d (d score_t / d source[s, d]) * source[s, d]|`` with ``score_t`` the output's norm (or
  ``score(out)[:, t]``), each row normalised to sum 1: ``(batch, T, S)``.
- ``cross_attention_map(model, run, layers=None)``: the cross-attention weights of ``model``'s layers
  (``multihead.analysis.capture``), averaged over heads and the chosen layers: ``(batch, T, S)``.
- ``agreement(attention, saliency)``: per row, the Pearson correlation of the two maps and their
  overlap ``sum_s min(a_s, r_s)`` (the share of relevance the attention covers), averaged.

The paper's attribution method (and its speech models) is not reproduced; gradient x input is the
standard choice this tool offers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .analysis import capture
from .errors import ShapeError


def input_saliency(fn, source: Tensor, score=None) -> Tensor:
    """Gradient x input relevance ``(batch, T, S)`` of ``source`` ``(batch, S, D)`` for every output
    position of ``fn(source)`` (module docstring); rows sum to 1."""
    if not isinstance(source, Tensor) or source.dim() != 3:
        raise ShapeError(f"source must be (batch, tokens, dim), got {getattr(source, 'shape', source)!r}")
    source = source.detach().requires_grad_()
    out = fn(source)
    if not isinstance(out, Tensor) or out.dim() != 3 or out.shape[0] != source.shape[0]:
        raise ShapeError(f"fn must return (batch, positions, dim), got {getattr(out, 'shape', out)!r}")
    scores = out.norm(dim=-1) if score is None else score(out)
    rows = []
    for t in range(scores.shape[1]):
        grad, = torch.autograd.grad(scores[:, t].sum(), source, retain_graph=True)
        rows.append((grad * source).sum(-1).abs())
    saliency = torch.stack(rows, 1).detach()
    return saliency / saliency.sum(-1, keepdim=True).clamp_min(torch.finfo(saliency.dtype).tiny)


def cross_attention_map(model: nn.Module, run, layers=None) -> Tensor:
    """Head- and layer-averaged weights ``(batch, T, S)`` of the attention layers (``layers``: indices
    or names, default all) while ``run(model)`` runs; every chosen layer must run once with one shape."""
    with capture(model, layers=layers) as rec:
        run(model)
    maps = [rec[name].weights.mean(1) for name in rec.layers]
    if len({m.shape for m in maps}) != 1:
        raise ShapeError(f"the chosen layers' maps differ in shape: {[tuple(m.shape) for m in maps]}")
    return torch.stack(maps).mean(0)


def agreement(attention: Tensor, saliency: Tensor) -> dict[str, float]:
    """``{"pearson": ..., "overlap": ...}`` averaged over rows (module docstring)."""
    if attention.shape != saliency.shape or attention.dim() != 3:
        raise ShapeError(f"attention {tuple(attention.shape)} and saliency {tuple(saliency.shape)} must be one "
                         f"(batch, T, S) shape")
    a, r = attention.double(), saliency.double()
    ac, rc = a - a.mean(-1, keepdim=True), r - r.mean(-1, keepdim=True)
    pearson = (ac * rc).sum(-1) / (ac.norm(dim=-1) * rc.norm(dim=-1)).clamp_min(1e-300)
    overlap = torch.minimum(a / a.sum(-1, keepdim=True), r / r.sum(-1, keepdim=True)).sum(-1)
    return {"pearson": float(pearson.mean()), "overlap": float(overlap.mean())}
