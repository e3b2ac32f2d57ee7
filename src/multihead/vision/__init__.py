"""Vision attention blocks on channels-last feature maps ``(batch, H, W, channels)``.

Each block is built from the shared patterns, scores and ``multihead.attention`` (any backend) -
none has attention math of its own; ``docs/vision.md`` says which paper each follows and how.
"""

from .aggregated import AggregatedAttention
from .base import GridAttention, OnTokens, check_feature_map
from .channel import ChannelGroupAttention
from .cross_shaped import CrossShapedWindowAttention
from .crossvit import CrossAttentionFusion, CrossViTAttention
from .halo import HaloAttention
from .local_global import LocalGlobalAttention
from .multiscale import MultiScaleHeadAttention
from .neighborhood import NeighborhoodAttention2d
from .sparse_global import SparseGlobalAttention, dlgsa_pair
from .window import WindowAttention, swin_pair

__all__ = ["GridAttention", "OnTokens", "check_feature_map", "WindowAttention", "swin_pair",
           "NeighborhoodAttention2d", "CrossShapedWindowAttention", "HaloAttention", "ChannelGroupAttention",
           "MultiScaleHeadAttention", "SparseGlobalAttention", "dlgsa_pair", "LocalGlobalAttention",
           "CrossAttentionFusion", "CrossViTAttention", "AggregatedAttention"]
