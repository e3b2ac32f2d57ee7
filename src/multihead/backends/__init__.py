"""Ways to run attention: ``reference`` (the definition), ``sdpa`` (torch's fused kernel),
``blocksparse`` (ours: only the tiles a pattern needs, forward and backward, any device), ``flex``
(FlexAttention, compiled), ``natten`` (NATTEN, optional), and two that split a request and send
each piece through ``auto``: ``documents`` (packed documents, routing's clusters) and ``heads``
(patterns that differ per head, a run of heads at a time)."""

from .base import Backend
from .blocksparse import BlockSparseBackend
from .dispatch import AUTO_RULES, BACKENDS, Explanation, choose, pick
from .flex import FlexBackend
from .head_groups import HeadGroupsBackend
from .natten import NattenBackend
from .reference import ReferenceBackend
from .sdpa import SDPABackend

__all__ = ["Backend", "BACKENDS", "AUTO_RULES", "Explanation", "choose", "pick", "ReferenceBackend", "SDPABackend",
           "BlockSparseBackend", "FlexBackend", "NattenBackend", "HeadGroupsBackend"]
