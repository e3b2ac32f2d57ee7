"""Ways to run attention: ``reference`` (the definition), ``sdpa`` (torch's fused kernel),
``flex`` (FlexAttention, compiled) and ``natten`` (NATTEN, optional)."""

from .base import Backend
from .dispatch import AUTO_RULES, BACKENDS, Explanation, choose
from .flex import FlexBackend
from .natten import NattenBackend
from .reference import ReferenceBackend
from .sdpa import SDPABackend

__all__ = ["Backend", "BACKENDS", "AUTO_RULES", "Explanation", "choose", "ReferenceBackend", "SDPABackend",
           "FlexBackend", "NattenBackend"]
