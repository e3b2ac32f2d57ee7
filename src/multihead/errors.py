"""Errors raised at the boundary of multihead.

Every error is a ``ValueError`` subclass whose message names the offending argument and the fix.
"""


class MultiheadError(ValueError):
    """Base class of every error multihead raises for bad input."""


class ShapeError(MultiheadError):
    """Tensors whose shapes, dtypes or devices do not fit together."""


class PatternError(MultiheadError):
    """A pattern that is malformed, out of range for the sequence, or leaves a query with no key."""


class BackendError(MultiheadError):
    """A backend asked for by name that cannot serve the request."""
