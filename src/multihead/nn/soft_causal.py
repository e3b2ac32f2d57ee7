"""iLLaMA's causal self-attention with a soft mask schedule (Wang et al., 2024, "Adapting LLaMA
Decoder to Vision Transformer", arXiv 2404.06773).

Against standard attention, iLLaMA makes a vision transformer causal (each image token sees the
tokens before it; the class token, placed after the image tokens, sees all of them:
``VisionTransformer(..., class_token="post")``) and eases the causal mask in: early in training the
attention is a blend of bidirectional and causal, ``M = rate * 1 + (1 - rate) * tril`` with ``rate``
decayed linearly from its start value to 0 over the first ``cutoff`` steps (the authors'
``mask_scheduler``, mode ``soft``, schedule ``linear``). Here ``M`` weights the unnormalised
``exp(s)`` (the ``SoftCausal`` score, ``log M`` added to the logits) and the softmax normalises the
row, so ``rate = 0`` is exactly the causal attention the paper trains towards (run as the
``Causal()`` pattern). The authors' code multiplies the already-normalised probabilities by ``M``
instead, whose rows then do not sum to 1 (at ``rate = 0`` the future keys still count in the
denominators); that form is not reproduced.
"""

from __future__ import annotations

from torch import nn

from ..errors import ShapeError
from ..patterns import Causal
from ..scores import SoftCausal
from .attention import MultiHeadAttention


def _check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ShapeError(f"soft_mask_rate must be in [0, 1], got {rate!r}")
    return float(rate)


class SoftCausalAttention(MultiHeadAttention):
    """Self-attention under iLLaMA's soft causal mask (module docstring): ``soft_mask_rate`` 0 is causal
    attention (the ``Causal()`` pattern), 1 bidirectional, between them the ``SoftCausal`` score. Set
    the rate during training with ``set_soft_mask_rate``; topology options as ``MultiHeadAttention``."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, *, soft_mask_rate: float = 0.0,
                 **options):
        for name in ("pattern", "score", "kv_dim", "context_parallel"):
            if options.get(name) is not None:
                raise ShapeError(f"SoftCausalAttention sets its own {name}; drop {name}=")
        super().__init__(dim, heads, kv_heads, **options)
        self.soft_mask_rate = _check_rate(soft_mask_rate)

    @property
    def causal(self) -> bool:
        return self.soft_mask_rate == 0.0

    @property
    def pattern(self):
        return Causal() if self.soft_mask_rate == 0.0 else None

    @pattern.setter
    def pattern(self, value):
        """Only ``None`` (construction) or ``Causal()`` (``make_causal``: sets the rate to 0)."""
        if value == Causal():
            self.soft_mask_rate = 0.0
        elif value is not None:
            raise ShapeError(f"SoftCausalAttention chooses its pattern from soft_mask_rate (0: Causal(), else "
                             f"full with the SoftCausal score); set that instead of pattern={value!r}")

    def score_for(self, q, k):
        rate = self.soft_mask_rate
        return SoftCausal(rate) if 0.0 < rate < 1.0 else None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", soft_mask_rate={self.soft_mask_rate}"


def soft_mask_rate(step: int, cutoff: int, start: float = 1.0) -> float:
    """The rate at training ``step``: ``start`` decayed linearly to 0 over steps ``0 .. cutoff - 1``
    (``numpy.linspace(start, 0, cutoff)``, as the authors' scheduler), 0 from ``cutoff`` on."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ShapeError(f"step must be a non-negative integer, got {step!r}")
    if isinstance(cutoff, bool) or not isinstance(cutoff, int) or cutoff < 0:
        raise ShapeError(f"cutoff must be a non-negative integer, got {cutoff!r}")
    start = _check_rate(start)
    if step >= cutoff:
        return 0.0
    return start if cutoff == 1 else start * (1 - step / (cutoff - 1))


def set_soft_mask_rate(model: nn.Module, rate: float) -> int:
    """Set ``soft_mask_rate`` on every ``SoftCausalAttention`` in ``model``; how many were set."""
    rate = _check_rate(rate)
    found = 0
    for module in model.modules():
        if isinstance(module, SoftCausalAttention):
            module.soft_mask_rate = rate
            found += 1
    return found
