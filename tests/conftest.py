"""Shared fixtures and the one place where tolerances live.

Tolerance rule (FlashAttention's): a backend's error against a float64 reference may be at most
``FACTOR`` times the error of a naive computation of the same attention in the same dtype, plus a
floor: the dtype's rounding unit times the result's magnitude (at least 1). Rounding the inputs
alone moves a result by about that much; a sum over many pairs (a bias table's gradient) can land
that far off while the naive computation's own roundings happen to cancel its share.

Every test starts from the same seed of torch's generator (one per test, from its name), so a
failure reproduces whatever ran before it and whatever ``PYTHONHASHSEED`` is. Hypothesis draws
the same examples on every run too (profile "deterministic"); ``HYPOTHESIS_PROFILE=explore``
draws new ones each run, to search for failures.
"""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings

from multihead.backends.base import repeat_kv
from multihead.normalizers import as_normalizer
from multihead.patterns import Causal, Documents, Full, KeyPadding, PrefixLM, SlidingWindow
from multihead.scores import as_score

settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

FACTOR = 3.0
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}


def sequence_patterns(length: int, batch: int) -> dict:
    """The 1-D patterns every backend test runs, as factories, for ``length`` tokens and ``batch``
    elements (batch-dependent ones need it): windows, prefixes, packed documents, padding."""
    return {
        "full": lambda: Full(),
        "causal": lambda: Causal(),
        "window": lambda: SlidingWindow(5, 3),
        "causal_window": lambda: SlidingWindow(6, 0),
        "prefix": lambda: PrefixLM(7),
        "documents_cu": lambda: Documents(torch.tensor([0, 10, 11, 30, length])),
        "documents_ids": lambda: Documents(doc_ids=torch.tensor(
            [[0] * 20 + [1] * (length - 20), [5] * 3 + [2] * (length - 3)])) & Causal(),
        "padding_causal": lambda: KeyPadding(
            torch.arange(length).expand(batch, length) >= torch.tensor([[length], [25]])) & Causal(),
        "window_or_prefix": lambda: SlidingWindow(3, 0) | PrefixLM(4),
    }


def naive_attention(q, k, v, pattern=None, score=None, scale=None, normalizer=None):
    """Attention computed in the inputs' own dtype (softmax in float32, as usual): the baseline.
    ``normalizer``: a ``multihead.normalizers`` one (default softmax), also applied in float32."""
    pattern = pattern or Full()
    score = as_score(score)
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale
    if score is not None:
        logits = score.apply_dense(logits, k.shape[2])
    mask = pattern.dense_mask(q.shape[2], k.shape[2], device=q.device)
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = as_normalizer(normalizer).weights(logits.float(), k.shape[2]).to(v.dtype)
    return torch.matmul(probs, v)


def assert_backends_match(run, want, inputs, backends=("reference", "sdpa", "blocksparse"),
                          loss=lambda out: out.square().sum()):
    """``run(backend)`` equals ``want`` on every backend, and so do the gradients of ``loss(out)``
    with respect to ``inputs`` (float64 tests against a transcription of a paper's formula)."""
    want_grads = torch.autograd.grad(loss(want), inputs)
    for backend in backends:
        got = run(backend)
        torch.testing.assert_close(got, want, msg=backend)
        for a, b in zip(torch.autograd.grad(loss(got), inputs), want_grads):
            torch.testing.assert_close(a, b, msg=backend)


def on_backend(module, x):
    """A ``run`` for ``assert_backends_match``: ``module(x)`` with ``module.backend`` set."""
    def run(backend):
        module.backend = backend
        return module(x)
    return run


def fit(loss_fn, parameters, steps: int = 150, lr: float = 1e-2) -> list[float]:
    """Adam on ``loss_fn()`` for ``steps`` steps; the losses (the "it trains" tests compare the last
    with the first)."""
    opt = torch.optim.Adam(parameters, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def gratings_losses(model, steps: int, channels: bool = True) -> list[float]:
    """AdamW (lr 3e-3) on 16 x 16 noisy sine gratings in 4 orientations (the label), 32 a batch, for
    ``steps`` steps: the losses, for the vision "it trains" tests. ``channels``: images as
    ``(B, 1, 16, 16)``, else ``(B, 16, 16)``."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    losses = []
    for _ in range(steps):
        labels = torch.randint(0, 4, (32,), generator=gen)
        angle = labels.float() * math.pi / 4
        images = torch.sin(2 * math.pi * (x * angle.cos()[:, None, None] + y * angle.sin()[:, None, None]) / 4)
        images = images + 0.3 * torch.randn(32, 16, 16, generator=gen)
        loss = F.cross_entropy(model(images.unsqueeze(1) if channels else images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def copy_back_losses(model, steps: int, back: int = 3, vocab: int = 8) -> list[float]:
    """Adam (lr 3e-3) on a language model ``model`` (tokens -> logits) predicting the token ``back``
    steps back in random 16 x 16 batches over ``vocab`` tokens, for ``steps`` steps: the losses, for
    the language-model "it trains" tests."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(vocab, (16, 16), generator=gen)
        loss = F.cross_entropy(model(tokens)[:, back:].reshape(-1, vocab), tokens[:, :-back].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def max_error(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def stable_seed(*names) -> int:
    """A seed in [0, 1000) from names, the same in every process (``hash`` of a string is not)."""
    return zlib.crc32(repr(names).encode()) % 1000


def assert_within_tolerance(result, truth, baseline, dtype, what="output"):
    """``|result - truth| <= FACTOR * |baseline - truth| + FLOOR[dtype] * max(1, |truth|)`` (max
    norms): the module docstring's rule."""
    err, base = max_error(result, truth), max_error(baseline, truth)
    floor = FLOOR[dtype] * max(1.0, truth.double().abs().max().item() if truth.numel() else 0.0)
    assert err <= FACTOR * base + floor, \
        f"{what}: error {err:.3g} exceeds {FACTOR} x the naive error {base:.3g} + floor {floor:.3g}"


@pytest.fixture(autouse=True)
def _seeded(request):
    """torch's generator seeded from the test's name: parameters drawn at construction (a bias
    table) do not depend on which tests ran before."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests use tiny tensors: one thread avoids OpenMP hand-offs that dominate their time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
