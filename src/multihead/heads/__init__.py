"""Head topologies: how per-head q, k, v are made from the input and how head outputs combine.

Each is an ``nn.Module`` that calls ``multihead.attention`` for the attention itself, so every
pattern, score and backend that can serve the call works with it. Every topology has
``attention_flops(seq_len)``, ``kv_cache_elements()`` and ``kv_cache_bytes(dtype)`` (conventions in
``multihead.heads.base``); ``multihead list --costs`` tabulates them.
"""

from .base import Costs, Topology, costs_of
from .compressed import CompressedAttention
from .grouped import GroupedQueryAttention, MultiQueryAttention
from .latent import LatentCache, MultiHeadLatentAttention
from .low_rank import LowRankAttention
from .mixture import MixtureOfHeads
from .selective import SelectiveMultiHeadAttention
from .single_head import SingleHeadAttention
from .sparse_query import SparseQueryAttention
from .talking import TalkingHeadsAttention
from .tpla import TensorParallelLatentAttention

__all__ = ["Costs", "Topology", "costs_of", "GroupedQueryAttention", "MultiQueryAttention",
           "MixtureOfHeads", "SparseQueryAttention", "MultiHeadLatentAttention", "LatentCache",
           "CompressedAttention", "LowRankAttention", "SingleHeadAttention", "TalkingHeadsAttention",
           "TensorParallelLatentAttention", "SelectiveMultiHeadAttention"]
