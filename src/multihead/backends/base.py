"""The backend interface: a way to run a validated request."""

from __future__ import annotations

from torch import Tensor

from ..request import Request


class Backend:
    """Runs a ``Request``. Subclasses implement ``limits`` (why they cannot serve a request, or
    None) and ``forward``; ``unsupported`` adds the checks every backend shares."""

    name: str
    #: Whether the first call of a configuration compiles a kernel (seconds on a small machine).
    compiles: bool = False
    #: Whether ``forward`` implements ``Request.head_mix`` (talking heads).
    supports_head_mix: bool = False

    def unsupported(self, req: Request) -> str | None:
        """Why this backend cannot serve ``req`` (a phrase completing "it ..."), or None."""
        if req.head_mix is not None and not self.supports_head_mix:
            return HEAD_MIX_REFUSAL
        return self.limits(req)

    def limits(self, req: Request) -> str | None:
        raise NotImplementedError

    def describe(self, req: Request) -> str:
        """Which of its paths would run ``req`` (empty when the backend has one)."""
        return ""

    def forward(self, req: Request) -> tuple[Tensor, Tensor | None]:
        """Return ``(output, weights)``; weights only when ``req.return_weights``."""
        raise NotImplementedError


HEAD_MIX_REFUSAL = ("does not serve head_mix (talking heads), which mixes the logits of all heads; "
                    "only reference materialises them (use backend='reference')")


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """Expand key/value heads for grouped-query attention: query head h reads kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)
