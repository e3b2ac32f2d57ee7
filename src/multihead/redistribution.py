"""Visual attention redistribution (VAR; "See What You Are Told: Visual Attention Sink in Large
Multimodal Models", 2025): a training-free change of the attention weights of the heads that look at
an image.

Some image tokens soak up attention without carrying information ("visual sink tokens"; they show a
massive activation in a few hidden dimensions). VAR takes a fraction ``p`` of the weight every query
puts on them, in the image-centric heads only, and gives it to the other image tokens in proportion
to their weights:

    a'_ij = (1 - p) a_ij                                 for j a visual sink,
    a'_ij = a_ij + p S_i a_ij / sum_{k in I} a_ik        for j in I (image tokens that are not sinks),

``S_i`` the weight of row ``i`` on the sinks; the other keys keep theirs, so each row still sums to
its old total. A head is image-centric when its queries give at least ``rho`` of their weight to ``I``
(``image_centric_heads``).

- ``find_sinks(hidden, dims, threshold)``: tokens whose activation in the sink dimensions ``dims``
  exceeds ``threshold`` in magnitude;
- ``redistribute(weights, sinks, image, p)``: the formula above on weights ``(B, H, Lq, Lk)``;
- ``redistributed_attention(model, heads, sinks, image, p)``: a context manager that applies it to the
  chosen heads of a multihead model (a head hook recomputes their weights through the reference
  backend and replaces their outputs with ``A' V``).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn

from .analysis.capture import recompute_weights
from .analysis.layers import add_head_hook, select_layers
from .errors import ShapeError


def find_sinks(hidden: Tensor, dims, threshold: float) -> Tensor:
    """Bool ``(batch, tokens)``: tokens whose ``|hidden[..., d]|`` exceeds ``threshold`` for some
    sink dimension ``d`` in ``dims``."""
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise ShapeError(f"hidden must be (batch, tokens, dim), got {getattr(hidden, 'shape', hidden)!r}")
    dims = list(dims)
    if not dims or not all(isinstance(d, int) and 0 <= d < hidden.shape[-1] for d in dims):
        raise ShapeError(f"dims must be indices of hidden's {hidden.shape[-1]} channels, got {dims!r}")
    return (hidden[..., dims].abs() > threshold).any(-1)


def _check_masks(weights: Tensor, sinks: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(weights, Tensor) or weights.dim() != 4:
        raise ShapeError(f"weights must be (batch, heads, queries, keys), got {getattr(weights, 'shape', weights)!r}")
    shape = (weights.shape[0], weights.shape[-1])
    for name, m in (("sinks", sinks), ("image", image)):
        if not isinstance(m, Tensor) or m.dtype != torch.bool or m.shape != shape:
            raise ShapeError(f"{name} must be a bool tensor (batch, keys) = {shape}, got "
                             f"{getattr(m, 'dtype', type(m).__name__)} {tuple(getattr(m, 'shape', ()))}")
    sink = (sinks & image)[:, None, None, :]
    rest = (image & ~sinks)[:, None, None, :]
    return sink, rest


def redistribute(weights: Tensor, sinks: Tensor, image: Tensor, p: float) -> Tensor:
    """VAR on ``weights`` ``(B, H, Lq, Lk)``: a fraction ``p`` of each row's weight on the image sinks
    moves to the other image tokens, in proportion to their weights (module docstring). ``sinks`` and
    ``image`` are bool ``(B, Lk)``; a row with no weight on non-sink image tokens is left as it is."""
    if not 0.0 <= p <= 1.0:
        raise ShapeError(f"p must lie in [0, 1], got {p!r}")
    sink, rest = _check_masks(weights, sinks, image)
    on_sinks = (weights * sink).sum(-1, keepdim=True)
    on_rest = (weights * rest).sum(-1, keepdim=True)
    movable = on_rest > 0
    gain = torch.where(movable, p * on_sinks / on_rest.clamp_min(torch.finfo(weights.dtype).tiny), 0.0)
    scale = torch.where(sink & movable, 1.0 - p, 1.0) + torch.where(rest, gain, 0.0)
    return weights * scale


def image_centric_heads(weights: Tensor, sinks: Tensor, image: Tensor, rho: float,
                        query_mask: Tensor | None = None) -> Tensor:
    """Bool ``(heads,)``: heads whose queries (those of ``query_mask`` ``(B, Lq)``, default all) give on
    average at least ``rho`` of their weight to the image tokens that are not sinks."""
    _, rest = _check_masks(weights, sinks, image)
    share = (weights * rest).sum(-1)  # (B, H, Lq)
    if query_mask is not None:
        keep = query_mask[:, None, :].to(share.dtype)
        ratio = (share * keep).sum((0, 2)) / keep.sum((0, 2)).clamp_min(1)
    else:
        ratio = share.mean((0, 2))
    return ratio >= rho


@contextmanager
def redistributed_attention(model: nn.Module, heads: dict, sinks: Tensor, image: Tensor, p: float):
    """Within the block, VAR on the heads ``{layer (index or name): [head, ...]}`` of ``model``'s
    attention layers (self-attention over the tokens that ``sinks`` and ``image`` describe)."""
    chosen = select_layers(model, list(heads))
    names = list(select_layers(model))

    def hook_for(selected):
        index = torch.as_tensor(sorted(selected), dtype=torch.long)

        def hook(module, call, out):
            weights = recompute_weights(call)
            new = redistribute(weights, sinks.to(weights.device), image.to(weights.device), p)
            v = call.v.repeat_interleave(call.q.shape[1] // call.v.shape[1], 1)
            replaced = torch.matmul(new.to(v.dtype), v)
            out = out.clone()
            out[:, index.to(out.device)] = replaced[:, index.to(out.device)].to(out.dtype)
            return out
        return hook

    with ExitStack() as stack:
        for layer, selected in heads.items():
            name = names[layer] if isinstance(layer, int) else layer
            stack.callback(add_head_hook(chosen[name], hook_for(selected)).remove)
        yield
