"""Vision-aware head divergence and head reinforcement ("Cracking the Code of Hallucination in LVLMs
with Vision-aware Head Divergence", 2024): which heads depend on a context (the image tokens of a
vision-language model), and a training-free boost of those heads.

- ``context_divergence(model, inputs, context)``: for every head of every attention layer, how much
  its output moves when the context is taken away. The model runs twice: as it is, and with the
  keys of the ``context`` tokens hidden from every query after them in every layer (a head hook
  reruns each layer's attention through ``multihead.attention`` with ``KeyPadding`` added to its own
  pattern, and that output flows on, so later layers see the context-free state). A head's
  divergence is the mean, over the queries after the context and the batch, of the L2 distance
  between its two outputs. The paper removes the image from the prompt; hiding its keys keeps the
  positions unchanged (the one difference).
- ``reinforcement_mask(divergence, top_k, alpha)``: multipliers ``(layers, heads)`` that scale the
  ``top_k`` most context-aware heads by ``alpha`` (1 elsewhere), for ``multihead.analysis.head_mask``:
  ``with head_mask(model, reinforcement_mask(vhd, 4, 1.5)): model(x)``.

The context must be a run of tokens ``[start, end)`` and every measured query comes after it, so each
keeps at least itself as a key.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .analysis.layers import add_head_hook, select_layers
from .errors import ShapeError
from .functional import attention
from .patterns import KeyPadding


class _Pass:
    def __init__(self, end: int, hide: Tensor | None):
        self.end, self.hide, self.outputs = end, hide, []

    def __call__(self, module, call, out):
        if self.hide is not None:
            options = dict(call.options)
            padding = KeyPadding(self.hide.to(call.k.device).expand(call.k.shape[0], -1))
            options["pattern"] = padding if options.get("pattern") is None else options["pattern"] & padding
            tail = attention(call.q[:, :, self.end:], call.k, call.v, **options, backend=getattr(module, "backend", "auto"))
            out = torch.cat([out[:, :, :self.end], tail.to(out.dtype)], 2)
        self.outputs.append(out[:, :, self.end:].detach())
        return out


def _run(model, inputs, layers, end, hide, run):
    passes = {name: _Pass(end, hide) for name in layers}
    handles = [add_head_hook(m, passes[name]) for name, m in layers.items()]
    try:
        with torch.no_grad():
            run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    for name, p in passes.items():
        if len(p.outputs) != 1:
            raise ShapeError(f"layer {name!r} ran {len(p.outputs)} times in one forward; context_divergence "
                             "needs one attention call per layer")
    return {name: p.outputs[0] for name, p in passes.items()}


def context_divergence(model: nn.Module, inputs, context: tuple[int, int], layers=None, run=None) -> Tensor:
    """``(layers, heads)``: each head's mean output shift when the keys of the tokens
    ``context = (start, end)`` are hidden (module docstring). ``run(model, inputs)`` runs a forward pass
    (default ``model(inputs)``); heads beyond a layer's count are NaN."""
    start, end = context
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end):
        raise ShapeError(f"context must be (start, end) token indices with 0 <= start < end, got {context!r}")
    run = run or (lambda m, x: m(x))
    chosen = select_layers(model, layers)
    full = _run(model, inputs, chosen, end, None, run)
    length = next(iter(full.values())).shape[2] + end
    if length <= end:
        raise ShapeError(f"no query comes after the context (tokens {start}..{end - 1} of {length})")
    hide = torch.zeros(1, length, dtype=torch.bool)
    hide[:, start:end] = True
    without = _run(model, inputs, chosen, end, hide, run)
    rows = [(full[n] - without[n]).norm(dim=-1).mean((0, 2)) for n in chosen]
    width = max(r.numel() for r in rows)
    return torch.stack([torch.cat([r.double(), r.new_full((width - r.numel(),), float("nan")).double()]) for r in rows])


def reinforcement_mask(divergence: Tensor, top_k: int, alpha: float) -> Tensor:
    """Multipliers ``(layers, heads)``: ``alpha`` for the ``top_k`` heads of highest ``divergence``
    (NaN entries, padding, never chosen), 1 for the others, NaN kept as padding."""
    if not isinstance(divergence, Tensor) or divergence.dim() != 2:
        raise ShapeError(f"divergence must be a (layers, heads) tensor, got {getattr(divergence, 'shape', divergence)!r}")
    valid = divergence.isfinite()
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= int(valid.sum()):
        raise ShapeError(f"top_k must be an integer in [1, {int(valid.sum())}], got {top_k!r}")
    flat = divergence.masked_fill(~valid, float("-inf")).flatten()
    out = torch.where(valid, torch.ones_like(divergence), torch.full_like(divergence, float("nan"))).flatten()
    out[flat.topk(top_k).indices] = float(alpha)
    return out.view_as(divergence)
