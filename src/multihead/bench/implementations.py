"""The implementations the benchmark runs a variant with: ours (``auto``), each backend forced by
name (SDPA with the pattern as a dense mask, FlexAttention, NATTEN, the naive eager reference), and
``torch.nn.MultiheadAttention`` (torch's SDPA on dense attention, no mask) as the outside baseline."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ..backends import BACKENDS

#: ``torch.nn.MultiheadAttention``: dense attention by torch's fused SDPA, the baseline peer.
TORCH_DENSE = "torch"

LABELS = {"auto": "ours (auto)", "sdpa": "SDPA dense-masked", "reference": "naive eager",
          "flex": "FlexAttention compiled", "natten": "NATTEN", "blocksparse": "block-sparse",
          "documents": "per document", "heads": "per head group",
          TORCH_DENSE: "torch SDPA dense"}


def known() -> list[str]:
    """Every implementation name ``--peers`` accepts."""
    return [TORCH_DENSE, *BACKENDS]


def default_peers() -> list[str]:
    """The peers measured unless named otherwise: every backend that does not compile per shape
    (FlexAttention compiles a kernel per pattern and length: opt in), and torch's dense module."""
    return [TORCH_DENSE, *(name for name, b in BACKENDS.items() if not b.compiles and name != "blocksparse")]


class TorchDense(nn.Module):
    """``torch.nn.MultiheadAttention`` on ``(batch, tokens, dim)``: torch's own module, which runs
    dense attention (no mask) through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.inner = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.inner(x, x, x, need_weights=False)[0]


def with_backend(module: nn.Module, backend: str) -> bool:
    """Set the attention backend of ``module`` and of every submodule that has one; False when none
    has (the module does not run through ``multihead.attention``)."""
    found = False
    for sub in module.modules():
        if isinstance(getattr(sub, "backend", None), str):
            sub.backend = backend
            found = True
    return found


@contextlib.contextmanager
def backends_used() -> Iterator[set[str]]:
    """Collect the names of the backends that run attention inside the ``with`` block (what
    ``auto`` chose)."""
    used: set[str] = set()
    patched = []
    for name, backend in BACKENDS.items():
        had_own = "forward" in vars(backend)
        original = backend.forward

        def recording(req, _name=name, _forward=original):
            used.add(_name)
            return _forward(req)

        backend.forward = recording
        patched.append((backend, had_own, original))
    try:
        yield used
    finally:
        for backend, had_own, original in patched:
            if had_own:
                backend.forward = original
            else:
                del backend.forward  # back to the class's method
