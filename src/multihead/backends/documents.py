"""Packed documents run one document at a time, each by the fastest backend for it; routing's
clusters likewise, one dense block each."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import PatternError
from ..normalizers import Softmax
from ..patterns import Documents, Full, Pattern
from ..patterns.documents import PerDocument, split_documents
from ..patterns.dynamic import ClusterPattern
from ..scores.reindexed import Reindexed
from .base import Backend


def _document_pattern(pattern: Pattern | None, length: int) -> Pattern:
    """The pattern of one document as a request of its own. A pattern that refuses the length only
    because it would cover the whole document (a window or prefix longer than it) keeps the
    meaning it has in the packed stream through a one-document ``PerDocument``."""
    if pattern is None:
        return Full()
    try:
        pattern._checked(length, length)
        return pattern
    except PatternError:
        return PerDocument(Documents(torch.tensor([0, length])), (pattern,))


class DocumentsBackend(Backend):
    """Packed variable-length documents (``Documents(cu_seqlens) & pattern``), one at a time.

    Instead of one request over the packed stream, each document ``[s, e)`` becomes a request of its
    own - its slice of q, k, v, its pattern in its own frame, the score at its positions - run by the
    backend ``auto`` picks for it (SDPA's fused causal kernel for ``Documents & Causal``). Documents
    of equal length and pattern run together as one batch when there is no score. The time is that
    of the documents alone plus slicing: the padding-free execution of ByteTransformer (Zhai et al.,
    2023) on top of the existing kernels. Serves one split shared by the batch (``cu_seqlens``).
    """

    name = "documents"

    def limits(self, req):
        if req.return_weights:
            return "does not return attention weights (use backend='reference')"
        if cluster_runs(req) is not None:
            return None
        if req.q_order is not None or split_documents(req.pattern) is None:
            return ("serves only packed documents (Documents(cu_seqlens) & a pattern), one split "
                    "shared by the batch, and Routing's clusters (within Full or Causal, no score)")
        return None

    def forward(self, req):
        from ..functional import attention

        runs = cluster_runs(req)
        if runs is not None:
            return _clusters_by_sdpa(req, *runs), None

        bounds, patterns = split_documents(req.pattern)
        groups: dict = {}
        for d, ((s, e), p) in enumerate(zip(bounds, patterns)):
            key = (e - s, id(p)) if req.score is None else d
            groups.setdefault(key, []).append(d)
        lengths = [e - s for s, e in bounds]
        # One split per tensor: its backward assembles the gradient once, not once per document.
        q_docs, k_docs, v_docs = (t.split(lengths, 2) for t in (req.q, req.k, req.v))
        pieces = [None] * len(bounds)
        batch = req.batch
        for docs in groups.values():
            q, k, v = (parts[docs[0]] if len(docs) == 1 else torch.cat([parts[d] for d in docs], 0)
                       for parts in (q_docs, k_docs, v_docs))
            score = None if req.score is None else Reindexed(req.score, positions=bounds[docs[0]][0])
            out = attention(q, k, v, pattern=_document_pattern(patterns[docs[0]], lengths[docs[0]]),
                            score=score, scale=req.scale, dropout=req.dropout)
            for i, d in enumerate(docs):
                pieces[d] = out[i * batch:(i + 1) * batch]
        return torch.cat(pieces, 2), None


def cluster_runs(req) -> tuple[list[int], bool] | None:
    """Routing's clusters as runs of the frame (``ClusterPattern.frame_runs``: their lengths, cluster
    by cluster of each (batch, head) in turn), where each run is plain softmax attention: within
    ``Full`` or ``Causal``, no score, no head mixing."""
    pattern = req.pattern
    if (not isinstance(pattern, ClusterPattern) or req.score is not None or req.head_mix is not None
            or not isinstance(req.normalizer, Softmax)):
        return None
    runs = pattern.frame_runs()
    return None if runs is None else (runs[0].flatten().tolist(), runs[1])


def _clusters_by_sdpa(req, lengths: list[int], causal: bool) -> torch.Tensor:
    """Every cluster of every (batch, head) by SDPA's fused kernel on its run of the frame: exactly
    the pairs the clusters allow, no mask. The frame is split once per tensor, so backward
    assembles each gradient in one piece."""
    batch, heads, tokens, _ = req.q.shape
    q, k, v = (t.reshape(batch * heads * tokens, t.shape[-1]).split(lengths) for t in (req.q, req.k, req.v))
    outputs = []
    for qr, kr, vr in zip(q, k, v):
        if qr.shape[0] == 0:
            outputs.append(vr)
            continue
        out = F.scaled_dot_product_attention(qr[None, None], kr[None, None], vr[None, None], is_causal=causal,
                                             scale=req.scale, dropout_p=req.dropout)
        outputs.append(out[0, 0])
    return torch.cat(outputs).view(batch, heads, tokens, -1)
