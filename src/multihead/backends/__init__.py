"""Ways to run attention: ``reference`` (the definition) and ``sdpa`` (torch's fused kernel)."""

from .base import Backend
from .dispatch import AUTO_RULES, BACKENDS, Explanation, choose
from .reference import ReferenceBackend
from .sdpa import SDPABackend

__all__ = ["Backend", "BACKENDS", "AUTO_RULES", "Explanation", "choose", "ReferenceBackend", "SDPABackend"]
