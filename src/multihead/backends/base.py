"""The backend interface: a way to run a validated request."""

from __future__ import annotations

import functools

from torch import Tensor

from ..request import Request


class Backend:
    """Runs a ``Request``. ``unsupported`` says why it cannot (None when it can)."""

    name: str
    #: Whether the first call of a configuration compiles a kernel (seconds on a small machine).
    compiles: bool = False

    #: Whether ``forward`` implements ``Request.head_mix`` (talking heads). A backend that does not
    #: declare it refuses such requests: ``__init_subclass__`` wraps every ``unsupported``.
    supports_head_mix: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "unsupported" in cls.__dict__:
            cls.unsupported = _refuse_head_mix(cls.__dict__["unsupported"])

    def unsupported(self, req: Request) -> str | None:
        raise NotImplementedError

    def forward(self, req: Request) -> tuple[Tensor, Tensor | None]:
        """Return ``(output, weights)``; weights only when ``req.return_weights``."""
        raise NotImplementedError


HEAD_MIX_REFUSAL = ("does not serve head_mix (talking heads), which mixes the logits of all heads; "
                    "only reference materialises them (use backend='reference')")


def _refuse_head_mix(unsupported):
    @functools.wraps(unsupported)
    def checked(self, req):
        if getattr(req, "head_mix", None) is not None and not self.supports_head_mix:
            return HEAD_MIX_REFUSAL
        return unsupported(self, req)
    return checked


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """Expand key/value heads for grouped-query attention: query head h reads kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)
