"""Fusing attention layers by optimal transport ("Transformer Fusion with Optimal Transport", 2023):
merge two independently trained multi-head attention layers by first aligning their heads.

Averaging the weights of two models directly mixes unrelated heads (head ``i`` of one model need not
do what head ``i`` of the other does). The fusion here finds a transport plan between the heads of
``a`` and ``b`` - entropic optimal transport (Sinkhorn) with uniform marginals on the cost
``C_ij = ||theta_i(a) - theta_j(b)||^2``, ``theta_h`` a head's slices of ``W_Q``, ``W_K``, ``W_V`` (rows)
and ``W_O`` (columns) with biases - maps ``b``'s heads onto ``a``'s (``T = H * P``: row ``i`` a convex
combination of ``b``'s heads, a permutation when the plan is hard), and averages:
``theta_i(fused) = (1 - w) theta_i(a) + w sum_j T_ij theta_j(b)``. The paper also aligns the other
components (LayerNorm, MLP, residual stream) and fuses models of different widths; only the
attention heads of two ``MultiHeadAttention`` layers of one shape are fused here.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from .errors import ShapeError
from .nn.attention import MultiHeadAttention


def _head_params(m: MultiHeadAttention) -> Tensor:
    """``(heads, features)``: each head's rows of the q, k, v projections (weights and biases) and
    columns of the output projection."""
    if m.kv_heads != m.heads:
        raise ShapeError("fusion aligns heads one to one: use layers with kv_heads == heads")
    h, d = m.heads, m.head_dim
    parts = []
    for proj in (m.q_proj, m.k_proj, m.v_proj):
        w = proj.weight.view(h, d, -1).flatten(1)
        parts.append(w)
        if proj.bias is not None:
            parts.append(proj.bias.view(h, d))
    parts.append(m.out_proj.weight.view(-1, h, d).transpose(0, 1).flatten(1))
    return torch.cat(parts, 1)


def sinkhorn(cost: Tensor, reg: float = 0.1, iterations: int = 50000, tol: float = 1e-10) -> Tensor:
    """Entropic OT plan with uniform marginals for ``cost`` ``(n, n)`` (rows and columns sum to 1/n,
    to ``tol``, within ``iterations``); ``reg`` is relative to the mean cost."""
    if cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        raise ShapeError(f"cost must be square (n, n), got {tuple(cost.shape)}")
    n = cost.shape[0]
    scale = cost.mean().clamp_min(torch.finfo(cost.dtype).tiny)
    log_k = -cost / (reg * scale)
    log_u = torch.zeros(n, dtype=cost.dtype)
    log_v = torch.zeros(n, dtype=cost.dtype)
    log_mass = torch.full((n,), -torch.log(torch.tensor(float(n), dtype=cost.dtype)).item(), dtype=cost.dtype)
    for step in range(iterations):
        log_u = log_mass - torch.logsumexp(log_k + log_v[None, :], 1)
        log_v = log_mass - torch.logsumexp(log_k + log_u[:, None], 0)
        if step % 10 == 9:
            rows = torch.exp(log_u[:, None] + log_k + log_v[None, :]).sum(1)
            if float((rows - 1.0 / n).abs().max()) < tol:
                break
    return torch.exp(log_u[:, None] + log_k + log_v[None, :])


def head_transport(a: MultiHeadAttention, b: MultiHeadAttention, reg: float = 0.1) -> Tensor:
    """``T`` ``(heads, heads)``: row ``i`` the convex combination of ``b``'s heads matched to head ``i``
    of ``a`` (the Sinkhorn plan scaled by the head count)."""
    with torch.no_grad():
        pa, pb = _head_params(a).double(), _head_params(b).double()
        if pa.shape != pb.shape:
            raise ShapeError(f"the layers differ in shape: {tuple(pa.shape)} vs {tuple(pb.shape)} head parameters")
        cost = torch.cdist(pa, pb) ** 2
        return sinkhorn(cost, reg) * a.heads


def fuse(a: MultiHeadAttention, b: MultiHeadAttention, weight: float = 0.5, reg: float = 0.1) -> MultiHeadAttention:
    """A new layer whose heads average ``a``'s with ``b``'s heads transported onto them (module
    docstring); the output bias is averaged as it is. ``weight`` is ``b``'s share."""
    if not 0.0 <= weight <= 1.0:
        raise ShapeError(f"weight must lie in [0, 1], got {weight!r}")
    t = head_transport(a, b, reg)
    fused = copy.deepcopy(a)
    h, d = a.heads, a.head_dim
    with torch.no_grad():
        tt = t.to(a.q_proj.weight.dtype)
        for name in ("q_proj", "k_proj", "v_proj"):
            pa, pb, pf = getattr(a, name), getattr(b, name), getattr(fused, name)
            wb = torch.einsum("ij,jdc->idc", tt, pb.weight.view(h, d, -1)).reshape(pb.weight.shape)
            pf.weight.copy_((1 - weight) * pa.weight + weight * wb)
            if pa.bias is not None:
                bb = (tt @ pb.bias.view(h, d)).reshape(-1)
                pf.bias.copy_((1 - weight) * pa.bias + weight * bb)
        wo_b = torch.einsum("ij,ojd->oid", tt, b.out_proj.weight.view(-1, h, d)).reshape(b.out_proj.weight.shape)
        fused.out_proj.weight.copy_((1 - weight) * a.out_proj.weight + weight * wo_b)
        if a.out_proj.bias is not None:
            fused.out_proj.bias.copy_((1 - weight) * a.out_proj.bias + weight * b.out_proj.bias)
    return fused
