"""Hugging Face transformers through multihead: ``attn_implementation="multihead"``.

Importing this module registers ``"multihead"`` with transformers' ``AttentionInterface`` (the
attention function) and ``AttentionMaskInterface`` (the mask function), so that

    import multihead.integrations.hf
    model = AutoModel.from_pretrained(path, attn_implementation="multihead")

runs every attention layer through ``multihead.attention`` and its backends (``backend="auto"``
unless ``use_pattern`` or ``use_multihead`` chose another), ``multihead.analysis.capture`` sees it,
and ``use_pattern(model, SlidingWindow(...))`` swaps a pattern or score into the trained model. The
mask function reads the layer's mask settings (causal, sliding window, padding) and hands the
attention function a ``StructuredMask`` instead of an ``N x N`` tensor, which becomes ``Causal() &
SlidingWindow(w - 1, 0) & KeyPadding``; the attention function adds ``softcap`` (a ``Softcap`` score)
and gpt-oss's ``s_aux`` sinks (a zero key with a per-head logit), so ``backend="auto"`` can choose a
structured backend (block-sparse) for a long prefill. Masks it does not recognise (packed
sequences, chunked or custom mask functions, static caches) stay dense: ``Causal``, ``KeyPadding``
or a ``BooleanMask``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..cache import BooleanMask
from ..errors import PatternError, ShapeError
from ..functional import attention
from ..nn.attention import run_head_hooks
from ..patterns import Causal, Full, KeyPadding, Pattern, Sinks, SlidingWindow, Spans
from ..scores import Score, as_score
from ..scores.softcap import Softcap

NAME = "multihead"


def without_empty_rows(pattern: Pattern, batch: int, q_len: int, kv_len: int, device) -> Pattern:
    """``pattern``, or where some query sees no key (a padded query under a window), a
    ``BooleanMask`` in which those queries see every key, as in transformers' eager attention."""
    if not pattern.empty_rows(q_len, kv_len, device).any():
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


@dataclass(frozen=True, eq=False)
class QueryRows(Pattern):
    """The queries marked in ``rows`` ``(batch, kv_len)`` (key frame) see every key: what a padded
    query sees under left padding, so that its row is not empty (its output is never read)."""

    rows: Tensor = field(repr=False)

    @property
    def batch_size(self) -> int:
        return self.rows.shape[0]

    def __repr__(self):
        return f"QueryRows(batch={self.rows.shape[0]})"

    def check(self, q_len, kv_len):
        if self.rows.shape[1] != kv_len:
            raise PatternError(f"{self!r} covers {self.rows.shape[1]} positions, not kv_len={kv_len}")

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.rows.to(q_idx.device)[b, q_idx] & (kv_idx >= 0)

    def _spans(self, q_pos, kv_len):
        marked = self.rows.to(q_pos.device)[:, q_pos]  # (B, q_len)
        end = torch.where(marked, kv_len, 0)
        return Spans.interval(torch.zeros_like(end).unsqueeze(1), end.unsqueeze(1), kv_len)


@dataclass(frozen=True, eq=False)
class StructuredMask:
    """What ``multihead_mask`` gives transformers instead of a dense mask, when it recognises the
    mask function: causal or not, how far a query may look back (``left`` keys) and ahead
    (``right``; None: no bound), and the kept keys ``keep`` ``(batch, kv_len)`` (None: no padding).
    Queries are aligned with the last keys."""

    causal: bool
    left: int | None
    right: int | None
    keep: Tensor | None
    q_length: int
    kv_length: int

    def pattern(self) -> Pattern | None:
        parts = []
        if self.causal and self.q_length > 1:  # one query, aligned with the last key, sees every key
            parts.append(Causal())
        reach = self.kv_length - 1  # a bound at least this far constrains nothing
        left = reach if self.left is None else min(self.left, reach)
        right = 0 if self.causal else (reach if self.right is None else min(self.right, reach))
        if left < reach or (right < reach and not self.causal):
            parts.append(SlidingWindow(left, right))
        base = None
        for part in parts:
            base = part if base is None else base & part
        if self.keep is None:
            return base
        keys = KeyPadding(~self.keep)
        padded = keys if base is None else base & keys
        empty = padded.key_counts(self.q_length, self.kv_length, self.keep.device)[:, 0] == 0  # (B, q_len)
        if bool(empty.any()):  # padded queries (left padding) see keys, not nothing, as in transformers
            rows = torch.zeros_like(self.keep)
            rows[:, self.kv_length - self.q_length:] = empty
            keys = keys | QueryRows(rows)
        return keys if base is None else base & keys


def _closure(function) -> dict:
    cells = function.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(function.__code__.co_freevars, cells)}


def _tighter(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def parse_mask_function(function) -> tuple[bool, int | None, int | None] | None:
    """``(causal, left, right)`` of a transformers mask function built from the causal,
    bidirectional and sliding-window pieces of ``transformers.masking_utils`` (through
    ``and_masks``): key ``j`` is allowed for query ``i`` when ``i - left <= j <= i + right`` (None:
    unbounded) and, if causal, ``j <= i``. transformers' causal window of ``w`` keeps ``j > i - w``
    (``left = w - 1``), its bidirectional one ``|i - j| <= w``. None for anything else (packed
    sequences, chunked attention, custom functions)."""
    from transformers import masking_utils as mu

    if function is mu.causal_mask_function:
        return True, None, None
    if function is mu.bidirectional_mask_function:
        return False, None, None
    name = getattr(function, "__qualname__", "")
    if name == "and_masks.<locals>.and_mask":
        causal, left, right = False, None, None
        for part in _closure(function).get("mask_functions", ()):
            parsed = parse_mask_function(part)
            if parsed is None:
                return None
            causal, left, right = causal or parsed[0], _tighter(left, parsed[1]), _tighter(right, parsed[2])
        return causal, left, right
    window = _closure(function).get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        return None
    if name == "sliding_window_overlay.<locals>.inner_mask":
        return False, window - 1, None
    if name == "sliding_window_bidirectional_overlay.<locals>.inner_mask":
        return False, window, window
    return None


def multihead_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                   mask_function=None, attention_mask: Tensor | None = None, use_vmap: bool = False, **kwargs):
    """transformers' mask function signature. A causal, bidirectional or sliding-window mask whose
    queries end with the keys (generation with or without a cache) becomes a ``StructuredMask``
    (no ``N x N`` tensor), which ``multihead_attention_forward`` turns into ``Causal() &
    SlidingWindow(w - 1, 0) & KeyPadding``; anything else is the boolean ``(B, 1, q_length,
    kv_length)`` mask transformers' SDPA path builds (or None where SDPA would skip it)."""
    from transformers import masking_utils as mu

    mask_function = mu.causal_mask_function if mask_function is None else mask_function
    dense = dict(q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                 attention_mask=attention_mask, use_vmap=use_vmap, **kwargs)
    parsed = None if use_vmap else parse_mask_function(mask_function)
    aligned = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset + q_length == kv_offset + kv_length
    if parsed is None or not aligned:
        return sdpa_mask(batch_size, q_length, kv_length, **dense)
    keep = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if keep is not None:
        keep = keep[:, kv_offset: kv_offset + kv_length].bool()
        if bool(keep.all()):
            keep = None
        elif keep.shape[0] != batch_size:
            keep = keep.expand(batch_size, -1)
    return StructuredMask(*parsed, keep, q_length, kv_length)


class SinkLogit(Score):
    """gpt-oss's attention sinks (``s_aux``): a per-head logit ``s_h`` for an extra key at position
    0 whose value is zero, so that a query can give weight to nothing (Xiao et al., 2023,
    arXiv 2309.17453, in the learned-logit form of OpenAI's gpt-oss). Added to the logit of key 0
    (a zero key, logit 0), so it is additive."""

    additive = True

    def __init__(self, logits: Tensor):
        super().__init__()
        self.logits = logits
        self.num_heads = logits.shape[0]

    def forward(self, score, b, h, q_idx, kv_idx):
        return score + torch.where(kv_idx == 0, self.logits.to(score.device)[h], 0).to(score.dtype)


def multihead_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                attention_mask, dropout: float = 0.0,
                                scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention function signature: ``query`` ``(B, H, Lq, D)``, ``key``/``value``
    ``(B, Hkv, Lk, D)`` (grouped-query attention is served natively, no repeat), returns
    ``(output (B, Lq, H, D), None)``. The layer's settings become structure: a ``StructuredMask``
    (from ``multihead_mask``) ``Causal() & SlidingWindow & KeyPadding``, ``softcap`` a ``Softcap``
    score, ``s_aux`` sinks a zero key in front with a per-head ``SinkLogit`` (``Sinks(pattern, 1)``);
    a dense mask a ``Causal``/``KeyPadding`` pattern or a ``BooleanMask``. Position biases are
    refused."""
    if kwargs.get("position_bias") is not None:
        raise ShapeError("position_bias is not supported by attn_implementation='multihead'; use 'eager'")
    settings = _settings(module)
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    q_len, kv_len = query.shape[2], key.shape[2]
    if isinstance(attention_mask, StructuredMask):
        if (attention_mask.q_length, attention_mask.kv_length) != (q_len, kv_len):
            raise ShapeError(f"the mask was made for q_len={attention_mask.q_length}, kv_len={attention_mask.kv_length}, "
                             f"the attention has {q_len} and {kv_len}")
        pattern = attention_mask.pattern()
    else:
        pattern = pattern_from_mask(attention_mask, q_len, kv_len, causal)
    if settings.pattern is not None:
        pattern = settings.pattern if pattern is None else pattern & settings.pattern
        pattern = without_empty_rows(pattern, query.shape[0], q_len, kv_len, query.device)
    softcap = Softcap(kwargs["softcap"]) if kwargs.get("softcap") is not None else None
    scores = [s for s in (settings.score, softcap) if s is not None]
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        if settings.score is not None:
            raise ShapeError("use_pattern's score cannot combine with attention sinks (s_aux): the sink key in front "
                             "shifts the key positions the score would read")
        batch, kv_heads, _, dim = key.shape
        key = torch.cat([key.new_zeros(batch, kv_heads, 1, dim), key], dim=2)
        value = torch.cat([value.new_zeros(batch, kv_heads, 1, value.shape[3]), value], dim=2)
        pattern = Sinks(Full() if pattern is None else pattern, 1)
        scores.append(SinkLogit(sinks.to(query.dtype)))
    options = dict(pattern=pattern, score=as_score(scores) if scores else None, scale=scaling, head_mix=None)
    if pattern is None and not scores and settings.backend == "auto" and q_len == 1:
        # a decoding step that sees every key: what auto runs (SDPA, no mask), without the dispatch
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    else:
        out = attention(query, key, value, **options, dropout=dropout, backend=settings.backend)
    out = run_head_hooks(module, out, query, key, value, options)
    return out.transpose(1, 2).contiguous(), None


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
