"""The backend interface: a way to run a validated request."""

from __future__ import annotations

from torch import Tensor

from ..request import Request


class Backend:
    """Runs a ``Request``. ``unsupported`` says why it cannot (None when it can)."""

    name: str
    #: Whether the first call of a configuration compiles a kernel (seconds on a small machine).
    compiles: bool = False

    def unsupported(self, req: Request) -> str | None:
        raise NotImplementedError

    def forward(self, req: Request) -> tuple[Tensor, Tensor | None]:
        """Return ``(output, weights)``; weights only when ``req.return_weights``."""
        raise NotImplementedError


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """Expand key/value heads for grouped-query attention: query head h reads kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)
