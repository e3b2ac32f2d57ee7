"""User-facing attention modules."""

from .attention import MultiHeadAttention

__all__ = ["MultiHeadAttention"]
