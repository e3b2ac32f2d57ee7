"""Score modifiers (how q.k becomes a logit) and positional transforms of q and k."""

from .alibi import ALiBi, alibi_slopes
from .base import Score, ScoreChain, as_score
from .complex_rotation import ComplexRotation
from .positions import RoPE
from .relative import RelativePositionBias, relative_position_bucket
from .relative2d import DynamicPositionBias, RelativeBias2d, RelativePositionBias2d
from .relative_embedding import RelativeEmbedding, RelativeLogits, skew
from .soft_causal import SoftCausal
from .softcap import Softcap

__all__ = ["Score", "ScoreChain", "as_score", "ALiBi", "alibi_slopes", "Softcap", "SoftCausal",
           "RelativePositionBias", "relative_position_bucket", "RoPE",
           "RelativeEmbedding", "RelativeLogits", "skew", "ComplexRotation",
           "RelativeBias2d", "RelativePositionBias2d", "DynamicPositionBias"]
