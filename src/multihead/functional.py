"""The one entry point: ``attention(q, k, v, *, pattern, score, ...)`` and ``explain``."""

from __future__ import annotations

from torch import Tensor

from .backends import Explanation, choose, pick
from .request import make_request


def attention(q: Tensor, k: Tensor, v: Tensor, *, pattern=None, score=None, scale: float | None = None,
              dropout: float = 0.0, backend: str = "auto", return_weights: bool = False, head_mix=None,
              normalizer=None):
    """Multi-head attention on tensors ``(batch, heads, tokens, head_dim)``.

    Args:
        q: queries ``(B, H, Lq, D)``.
        k, v: keys and values ``(B, Hkv, Lk, D)`` and ``(B, Hkv, Lk, Dv)``. ``H`` must be a multiple
            of ``Hkv`` (grouped-query attention; ``Hkv == 1`` is multi-query); query head ``h``
            reads key/value head ``h // (H // Hkv)``. ``Lq`` may differ from ``Lk``; queries are then
            aligned with the last keys.
        pattern: which pairs may meet (``multihead.patterns``); default ``Full()``.
        score: a score modifier or list of them (``multihead.scores``), applied to the scaled logits.
        scale: logit scale; default ``1 / sqrt(D)``.
        dropout: dropout probability on the attention weights (pass 0 at evaluation).
        backend: ``"auto"`` or a name from ``multihead.backends.BACKENDS``.
        return_weights: also return the attention weights ``(B, H, Lq, Lk)``.
        head_mix: talking heads (Shazeer et al., 2020): ``(pre, post)``, each an ``(H, H)`` tensor or
            None. ``pre`` mixes the scaled logits across heads before the score, mask and softmax
            (``logits'[g] = sum_h logits[h] pre[h, g]``), ``post`` mixes the probabilities after it;
            the weights returned are the mixed ones. It ties the heads together, so only backends
            declaring ``supports_head_mix`` (the reference) serve it.
        normalizer: how the masked logits become weights (``multihead.normalizers``): ``Softmax()``
            (default) or ``Sigmoid()`` (sigmoid attention, bias ``-log(kv_len)``; rows need not sum
            to 1, and a row that sees no key gives 0), or their names ``"softmax"`` / ``"sigmoid"``.
            Backends declare which normalizers they serve (``explain`` says why one cannot).

    Returns:
        the output ``(B, H, Lq, Dv)``, or ``(output, weights)`` when ``return_weights``.
    """
    req = make_request(q, k, v, pattern=pattern, score=score, scale=scale, dropout=dropout,
                       return_weights=return_weights, head_mix=head_mix, normalizer=normalizer)
    runner = pick(req, backend)
    out, weights = req.restore(*runner.forward(req))
    return (out, weights) if return_weights else out


def explain(q: Tensor, k: Tensor, v: Tensor, *, pattern=None, score=None, scale: float | None = None,
            dropout: float = 0.0, backend: str = "auto", return_weights: bool = False,
            head_mix=None, normalizer=None, show: bool = True) -> Explanation:
    """Say which backend ``attention`` would run with these arguments, and why not the others.

    Prints the explanation (unless ``show=False``) and returns it.
    """
    req = make_request(q, k, v, pattern=pattern, score=score, scale=scale, dropout=dropout,
                       return_weights=return_weights, head_mix=head_mix, normalizer=normalizer)
    _, explanation = choose(req, backend)
    if show:
        print(explanation)
    return explanation
