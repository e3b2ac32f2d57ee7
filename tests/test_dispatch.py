"""The backend choice: ``pick`` (what ``attention`` runs) and ``choose`` (what ``explain`` reports)
name the same backend; ``pick`` asks only the backends it needs; bad names fail clearly."""

from __future__ import annotations

import pytest
import torch

import multihead as mh
from multihead.backends import BACKENDS, choose, pick
from multihead.errors import BackendError
from multihead.patterns import Causal, Documents, Full, PerHead, SlidingWindow, TopK
from multihead.request import make_request
from multihead.scores import ALiBi

REQUESTS = {
    "full": lambda q: dict(pattern=Full()),
    "causal": lambda q: dict(pattern=Causal()),
    "window_alibi": lambda q: dict(pattern=SlidingWindow(8, 8), score=ALiBi(q.shape[1])),
    "documents": lambda q: dict(pattern=Documents(torch.tensor([0, 70, 128]))),
    "per_head": lambda q: dict(pattern=PerHead((Causal(), Causal(), SlidingWindow(5, 0), SlidingWindow(5, 0)))),
    "topk_dense": lambda q: dict(pattern=TopK(64)),
    "weights": lambda q: dict(pattern=Causal(), return_weights=True),
}


@pytest.mark.parametrize("name", REQUESTS)
def test_pick_runs_what_choose_explains(name):
    q = torch.randn(1, 4, 128, 16)
    req = make_request(q, q, q, **REQUESTS[name](q))
    chosen, explanation = choose(req, "auto")
    assert pick(req, "auto") is chosen
    assert explanation.backend in BACKENDS and BACKENDS[explanation.backend] is chosen
    assert mh.explain(q, q, q, show=False, **REQUESTS[name](q)).backend == explanation.backend


def test_a_named_backend_is_the_only_one_asked(monkeypatch):
    q = torch.randn(1, 2, 64, 8)
    req = make_request(q, q, q, pattern=SlidingWindow(4, 4))
    asked = []
    for backend_name, backend in BACKENDS.items():
        monkeypatch.setattr(backend, "unsupported",
                            lambda r, _n=backend_name, _f=backend.unsupported: asked.append(_n) or _f(r))
    assert pick(req, "blocksparse") is BACKENDS["blocksparse"]
    assert asked == ["blocksparse"]
    asked.clear()
    choose(req, "blocksparse")
    assert sorted(asked) == sorted(BACKENDS)


def test_bad_backend_names_fail_with_the_alternatives():
    q = torch.randn(1, 2, 32, 8)
    req = make_request(q, q, q, pattern=Causal(), return_weights=True)
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        pick(req, "nope")
    with pytest.raises(BackendError, match="cannot serve this request.*Backends that can: .*reference"):
        pick(req, "sdpa")
