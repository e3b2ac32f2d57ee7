"""Hugging Face transformers through multihead: ``attn_implementation="multihead"``.

Importing this module registers ``"multihead"`` with transformers' ``AttentionInterface`` (the
attention function) and ``AttentionMaskInterface`` (the mask function), so that

    import multihead.integrations.hf
    model = AutoModel.from_pretrained(path, attn_implementation="multihead")

runs every attention layer through ``multihead.attention`` and its backends (``backend="auto"``
unless ``use_pattern`` or ``use_multihead`` chose another), ``multihead.analysis.capture`` sees it,
and ``use_pattern(model, SlidingWindow(...))`` swaps a pattern or score into the trained model. The
mask function gives the boolean mask transformers' SDPA path builds; the attention function turns it
back into a multihead pattern (``Causal``, ``KeyPadding``, both, or ``BooleanMask`` for anything else),
so structured backends can serve it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..errors import PatternError, ShapeError
from ..functional import attention
from ..nn.attention import run_head_hooks
from ..patterns import Causal, KeyPadding, Pattern, Spans
from ..scores import Score, as_score
from ..scores.softcap import Softcap

NAME = "multihead"


@dataclass(frozen=True, eq=False)
class BooleanMask(Pattern):
    """An explicit mask ``(batch, heads or 1, q_len, kv_len)``, True where a query may see a key:
    what a Hugging Face mask becomes when it is not causal and/or key padding. Its spans are the
    runs of True in each row."""

    mask: Tensor = field(repr=False)

    def __post_init__(self):
        if not isinstance(self.mask, Tensor) or self.mask.dtype != torch.bool or self.mask.dim() != 4:
            raise PatternError(f"mask must be a bool tensor (batch, heads or 1, q_len, kv_len), got "
                               f"{getattr(self.mask, 'dtype', type(self.mask))} {tuple(getattr(self.mask, 'shape', ()))}")

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def num_heads(self) -> int | None:
        return self.mask.shape[1] if self.mask.shape[1] > 1 else None

    def __repr__(self):
        return f"BooleanMask{tuple(self.mask.shape)}"

    def check(self, q_len, kv_len):
        if tuple(self.mask.shape[2:]) != (q_len, kv_len):
            raise PatternError(f"{self!r} does not fit q_len={q_len}, kv_len={kv_len}")

    def mask_mod(self, b, h, q_idx, kv_idx):
        offset = self.mask.shape[3] - self.mask.shape[2]
        h = h if self.mask.shape[1] > 1 else torch.zeros_like(h)
        return self.mask.to(q_idx.device)[b, h, q_idx - offset, kv_idx]

    def _spans(self, q_pos, kv_len):
        keep = self.mask.to(q_pos.device).long()
        rows = keep.flatten(0, 2)
        zero = rows.new_zeros(rows.shape[0], 1)
        edge = torch.diff(rows, dim=-1, prepend=zero, append=zero)  # +1 at a run's start, -1 after its end
        runs = max(int((edge == 1).sum(-1).max()), 1)
        starts = torch.full((rows.shape[0], runs), kv_len, device=rows.device)
        ends = starts.clone()
        for target, marker in ((starts, 1), (ends, -1)):
            hit = edge == marker
            row, col = hit.nonzero(as_tuple=True)
            target[row, (hit.long().cumsum(-1) - 1)[row, col]] = col
        shape = (*keep.shape[:3], runs)
        return Spans(starts.view(shape), ends.view(shape), kv_len)


def without_empty_rows(pattern: Pattern, batch: int, q_len: int, kv_len: int, device) -> Pattern:
    """``pattern``, or where some query sees no key (a padded query under a window), a
    ``BooleanMask`` in which those queries see every key, as in transformers' eager attention."""
    if not (pattern.key_counts(q_len, kv_len, device) == 0).any():
        return pattern
    mask = pattern.dense_mask(q_len, kv_len, device=device).expand(batch, -1, -1, -1)
    return BooleanMask(mask | ~mask.any(-1, keepdim=True))


def pattern_from_mask(mask: Tensor | None, q_len: int, kv_len: int, causal: bool) -> Pattern | None:
    """The multihead pattern of a transformers attention mask: a bool ``(B, 1, q_len, kv_len)``
    tensor (True: may attend) or an additive float one (0 or the dtype's minimum), or None, which
    means causal when the module is causal and ``q_len > 1`` (transformers' SDPA convention), else
    full. Rows with no visible key (padded queries under left padding) see every key, as in
    transformers' eager attention."""
    if mask is None:
        return Causal() if causal and q_len > 1 else None
    if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (q_len, kv_len):
        raise ShapeError(f"attention_mask must have shape (batch, 1, {q_len}, {kv_len}), got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        allowed = mask == 0
        if not (allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all():
            raise ShapeError("attention_mask: an additive float mask must hold only 0 and the dtype's minimum; "
                             "a bias belongs in a multihead score (use_pattern(model, score=...))")
        mask = allowed
    mask = mask | ~mask.any(-1, keepdim=True)  # rows with no key see every key
    if mask.all():
        return None
    keep = mask[:, 0].any(1)  # (B, kv_len): keys some query sees
    padding = KeyPadding(~keep)
    if torch.equal(mask, keep[:, None, None, :].expand_as(mask)):
        return padding
    causal_mask = Causal().dense_mask(q_len, kv_len, device=mask.device)
    if torch.equal(mask, causal_mask & keep[:, None, None, :]):
        return Causal() & padding if not keep.all() else Causal()
    return BooleanMask(mask)


@dataclass
class Settings:
    """What ``use_pattern`` / ``use_multihead`` set on a Hugging Face attention module: a pattern
    intersected with the model's own mask, a score, and the backend."""

    pattern: Pattern | None = None
    score: Score | None = None
    backend: str = "auto"


def _settings(module: nn.Module) -> Settings:
    return module.__dict__.get("_multihead_settings") or Settings()


def multihead_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                attention_mask: Tensor | None, dropout: float = 0.0,
                                scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention function signature: ``query`` ``(B, H, Lq, D)``, ``key``/``value``
    ``(B, Hkv, Lk, D)`` (grouped-query attention is served natively, no repeat), returns
    ``(output (B, Lq, H, D), None)``. ``softcap`` becomes a ``Softcap`` score; attention sinks
    (``s_aux``) and position biases are refused."""
    for unsupported in ("s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise ShapeError(f"{unsupported} is not supported by attn_implementation='multihead'; use 'eager'")
    settings = _settings(module)
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    pattern = pattern_from_mask(attention_mask, query.shape[2], key.shape[2], causal)
    if settings.pattern is not None:
        pattern = settings.pattern if pattern is None else pattern & settings.pattern
        pattern = without_empty_rows(pattern, query.shape[0], query.shape[2], key.shape[2], query.device)
    softcap = Softcap(kwargs["softcap"]) if kwargs.get("softcap") is not None else None
    scores = [s for s in (settings.score, softcap) if s is not None]
    options = dict(pattern=pattern, score=as_score(scores) if scores else None, scale=scaling, head_mix=None)
    out = attention(query, key, value, **options, dropout=dropout, backend=settings.backend)
    out = run_head_hooks(module, out, query, key, value, options)
    return out.transpose(1, 2).contiguous(), None


def multihead_mask(batch_size: int, q_length: int, kv_length: int, **kwargs):
    """transformers' mask function signature: the boolean ``(B, 1, q_length, kv_length)`` mask (or
    None where SDPA would skip it: full without padding, or plain causal), which
    ``multihead_attention_forward`` turns into a pattern."""
    return sdpa_mask(batch_size, q_length, kv_length, **kwargs)


def register() -> None:
    """Register ``"multihead"`` with transformers (done when this module is imported)."""
    AttentionInterface.register(NAME, multihead_attention_forward)
    AttentionMaskInterface.register(NAME, multihead_mask)


register()


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that call transformers' attention interface (a ``config`` and a
    ``scaling``)."""
    from ..analysis.layers import attention_layers

    return list(attention_layers(model).values())


def use_multihead(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Switch a loaded Hugging Face model to ``attn_implementation="multihead"``; ``backend``
    (None: keep each layer's, ``"auto"`` at first) chooses the backend of every layer."""
    if not hasattr(model, "set_attn_implementation"):
        raise ShapeError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel")
    model.set_attn_implementation(NAME)
    if backend is not None:
        for module in attention_modules(model):
            settings = _settings(module)
            module.__dict__["_multihead_settings"] = Settings(settings.pattern, settings.score, backend)
    return model


def use_pattern(model: nn.Module, pattern: Pattern | Score | None = None, *, score=None,
                backend: str | None = None, layers=None) -> nn.Module:
    """Try a multihead pattern and/or score on a trained Hugging Face model.

    ``pattern`` (e.g. ``SlidingWindow(64)``) is intersected with the model's own mask (padding,
    causality); a ``Score`` passed in its place, or ``score``, is added to the logits. ``layers``
    (indices or names of ``attention_layers``) restricts the swap; ``pattern=None`` and ``score=None``
    put the layers back to the model's own attention. Switches the model to
    ``attn_implementation="multihead"``. Returns the model. A learnable score is not registered as a
    parameter of the model: move and train it yourself.
    """
    from ..analysis.layers import head_count, select_layers

    if isinstance(pattern, Score):
        pattern, score = None, pattern if score is None else as_score([pattern, score])
    if pattern is not None and not isinstance(pattern, Pattern):
        raise PatternError(f"pattern must be a multihead Pattern or Score, got {type(pattern).__name__}")
    score = as_score(score)
    chosen = select_layers(model, layers)
    if score is not None:
        for module in chosen.values():
            score.check(head_count(module))
    use_multihead(model)
    for module in chosen.values():
        previous = _settings(module)
        module.__dict__["_multihead_settings"] = Settings(pattern, score, previous.backend if backend is None else backend)
    return model
