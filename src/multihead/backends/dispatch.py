"""Backend registry, the ``auto`` table, and ``explain``."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BackendError
from ..patterns import Causal, Full
from ..patterns.documents import split_documents
from ..request import Request
from .base import Backend
from .blocksparse import BlockSparseBackend
from .documents import DocumentsBackend, cluster_runs
from .flex import FlexBackend
from .head_groups import HeadGroupsBackend, head_split
from .natten import NattenBackend
from .reference import ReferenceBackend
from .sdpa import SDPABackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(), SDPABackend(), BlockSparseBackend(),
                                                     FlexBackend(), NattenBackend(), DocumentsBackend(),
                                                     HeadGroupsBackend())}

def _mask_free(r: Request) -> bool:
    """Full, or square causal, attention with no score: SDPA's fused kernels need no mask."""
    plain = isinstance(r.pattern, Full) or (isinstance(r.pattern, Causal) and r.q_len == r.kv_len)
    return plain and r.score is None


def _without_kernel(r: Request) -> bool:
    """On CPU, where block-sparse cannot use its native kernel for ``r`` (it would run PyTorch tiles)."""
    return r.device.type == "cpu" and BACKENDS["blocksparse"].native_unsupported(r) is not None


def _packed_documents(r: Request) -> bool:
    """Packed documents on CPU without the native kernel, long enough on average that one call per
    document pays off (with the kernel, block-sparse runs them 1.6-2.9x faster: docs/performance.md)."""
    split = split_documents(r.pattern)  # the pattern first: the kernel's checks only for documents
    if split is None or not _without_kernel(r) or BACKENDS["documents"].unsupported(r) is not None:
        return False
    return r.q_len / len(split[0]) >= 64


def _plain_clusters(r: Request) -> bool:
    """Routing's clusters on CPU without the native kernel whose runs are plain attention (within
    Full or Causal, no score), of 64+ tokens on average (with the kernel, block-sparse's tiles of
    key runs are faster: docs/performance.md)."""
    runs = cluster_runs(r)
    return runs is not None and r.batch * r.heads * r.q_len / max(1, len(runs[0])) >= 64 and _without_kernel(r)


def _dense_key_lists(r: Request) -> bool:
    """Explicit key lists (``TopK``) on CPU that hold 1/16 or more of the keys (1/8 without
    gradients), small enough for a dense mask: each row's own gathered keys then cost more than
    SDPA over every pair (benchmarks/dispatch_crossover.py --key-lists)."""
    lists = r.pattern.key_lists()
    if r.device.type != "cpu" or lists is None:
        return False
    share = 16 if r.needs_grad else 8
    return r.kv_len <= share * lists[0].shape[-1] and r.batch * r.heads * r.q_len * r.kv_len <= 1 << 26


# The auto table: the first rule whose condition holds gives the order in which backends are
# tried; the first one able to serve the request runs it. The orders follow measurements
# (docs/performance.md, benchmarks/dispatch_crossover.py): on CPU, block-sparse ties SDPA with a
# dense mask at 128 tokens and beats it from 512 on for every pattern tried; SDPA wins where no
# mask is needed.
AUTO_RULES: list[tuple[str, object, tuple[str, ...]]] = [
    ("attention weights requested", lambda r: r.return_weights, ("reference",)),
    ("packed documents of 64+ tokens on CPU without the native kernel: each alone (benchmarks/varlen.py)",
     _packed_documents, ("documents", "blocksparse", "sdpa", "reference")),
    ("Routing's clusters of 64+ tokens on CPU without the native kernel, plain inside: each by SDPA "
     "(benchmarks/sparse_patterns.py)", _plain_clusters, ("documents", "blocksparse", "sdpa", "reference")),
    ("no mask and no score: SDPA's fused kernels", _mask_free, ("sdpa", "blocksparse", "reference")),
    ("a pattern that differs per head in runs of heads, on CPU: each run alone (benchmarks/vision_blocks.py)",
     lambda r: r.device.type == "cpu" and head_split(r) is not None,
     ("heads", "blocksparse", "sdpa", "reference")),
    ("key lists of 1/16+ of the keys (1/8+ without gradients) on CPU: SDPA with their dense mask",
     _dense_key_lists, ("sdpa", "blocksparse", "reference")),
    ("CUDA without dropout: FlexAttention", lambda r: r.device.type == "cuda" and r.dropout == 0,
     ("flex", "blocksparse", "sdpa", "reference")),
    ("a mask or a score: block-sparse, which skips empty tiles",
     lambda r: True, ("blocksparse", "sdpa", "reference")),
]
@dataclass(frozen=True)
class Explanation:
    """Which backend runs a request and why each other one would not."""

    backend: str
    rule: str
    reasons: dict[str, str]
    #: How a dynamic pattern (``TopK``, ``Routing``) was resolved for this input; empty for a static one
    pattern: str = ""

    def __str__(self) -> str:
        lines = [f"backend: {self.backend}  (auto rule: {self.rule})"]
        if self.pattern:
            lines.append(f"pattern: {self.pattern}")
        for name, why in self.reasons.items():
            lines.append(f"  {name:<10} {why}")
        return "\n".join(lines)


def pick(req: Request, backend: str) -> Backend:
    """The backend that runs ``req``: the named one (checked), or the first able one of the auto
    rule that applies. Asks only the backends it needs (``choose`` asks them all, to explain)."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend {backend!r}; choose one of {['auto', *BACKENDS]}")
        if BACKENDS[backend].unsupported(req) is not None:
            choose(req, backend)  # raises, naming the backends that can
        return BACKENDS[backend]
    for _, applies, order in AUTO_RULES:
        if applies(req):
            for name in order:
                if BACKENDS[name].unsupported(req) is None:
                    return BACKENDS[name]
    return choose(req, backend)[0]  # raises, with every backend's reason


def choose(req: Request, backend: str) -> tuple[Backend, Explanation]:
    """Pick the backend for ``req`` as ``pick`` does, and explain why each other one was not."""
    reasons = {name: b.unsupported(req) for name, b in BACKENDS.items()}
    if backend != "auto":
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend {backend!r}; choose one of {['auto', *BACKENDS]}")
        if reasons[backend] is not None:
            able = [n for n, why in reasons.items() if why is None]
            raise BackendError(f"backend {backend!r} cannot serve this request: it {reasons[backend]}. "
                               f"Backends that can: {able} (or backend='auto')")
        explanation = Explanation(backend, "requested by name", _describe(req, reasons, backend, ()), req.resolved_how)
        return BACKENDS[backend], explanation
    for rule, applies, order in AUTO_RULES:
        if applies(req):
            for name in order:
                if reasons[name] is None:
                    return BACKENDS[name], Explanation(name, rule, _describe(req, reasons, name, order),
                                                       req.resolved_how)
    raise BackendError(f"no backend can serve this request: {reasons}")


def _describe(req: Request, reasons: dict[str, str | None], chosen: str,
              order: tuple[str, ...]) -> dict[str, str]:
    described = {}
    for name, why in reasons.items():
        if name == chosen:
            path = BACKENDS[name].describe(req)
            described[name] = f"chosen ({path})" if path else "chosen"
        elif why is not None:
            described[name] = f"cannot: it {why}"
        elif name in order and order.index(name) > order.index(chosen):
            described[name] = "could serve, but comes later in the auto order"
        else:
            described[name] = "could serve, but the auto rule does not list it"
    return described
