"""Every topology learns: a few hundred Adam steps on a generated task take the loss well below its
start (seconds each on CPU).

Sequence topologies get associative recall: ``pairs`` tokens each carry a (key, value) pair, a last
token carries a query key, and the value stored under that key must be predicted from the last
position (one attention layer solves it by matching the query key with the pair keys). The pooling
topology (low-rank compact attention) gets its text-classification form: one flagged token among
noise carries the class, the pooled embedding must reveal it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from multihead.heads import (CompressedAttention, GroupedQueryAttention, LowRankAttention, MixtureOfHeads,
                             MultiHeadLatentAttention, SingleHeadAttention, SparseQueryAttention,
                             TalkingHeadsAttention)
from multihead.patterns import Causal

DIM, KEYS, VALUES, PAIRS, BATCH, STEPS = 32, 16, 8, 6, 64, 200


class Recall(nn.Module):
    """Embeddings -> residual topology -> norm -> value logits at the last position."""

    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.keys = nn.Embedding(KEYS, DIM)
        self.values = nn.Embedding(VALUES + 1, DIM)  # the last one: "no value" (the query token)
        self.mixer, self.norm, self.head = mixer, nn.LayerNorm(DIM), nn.Linear(DIM, VALUES)

    def forward(self, keys, values):
        x = self.keys(keys) + self.values(values)
        x = x + self.mixer(x)
        return self.head(self.norm(x[:, -1]))


def recall_batch(gen):
    keys = torch.rand(BATCH, KEYS, generator=gen).argsort(-1)[:, :PAIRS]  # distinct keys per sequence
    values = torch.randint(VALUES, (BATCH, PAIRS), generator=gen)
    which = torch.randint(PAIRS, (BATCH,), generator=gen)
    rows = torch.arange(BATCH)
    query = keys[rows, which].unsqueeze(1)
    tokens_k = torch.cat([keys, query], 1)
    tokens_v = torch.cat([values, torch.full((BATCH, 1), VALUES)], 1)
    return (tokens_k, tokens_v), values[rows, which]


class Flagged(nn.Module):
    """Pooling classifier: class + flag embeddings -> pooled heads -> class logits."""

    def __init__(self, pool: LowRankAttention):
        super().__init__()
        self.classes, self.flags = nn.Embedding(VALUES, DIM), nn.Embedding(2, DIM)
        self.pool, self.head = pool, nn.Linear(pool.heads * DIM, VALUES)

    def forward(self, classes, flags):
        return self.head(self.pool(self.classes(classes) + self.flags(flags)).flatten(1))


def flagged_batch(gen, tokens=12):
    classes = torch.randint(VALUES, (BATCH, tokens), generator=gen)
    where = torch.randint(tokens, (BATCH,), generator=gen)
    flags = torch.zeros(BATCH, tokens, dtype=torch.long)
    rows = torch.arange(BATCH)
    flags[rows, where] = 1
    return (classes, flags), classes[rows, where]


def train(model, batches, aux=None, steps=STEPS, lr=3e-3):
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        inputs, target = batches(gen)
        loss = nn.functional.cross_entropy(model(*inputs), target)
        total = loss if aux is None else loss + 0.01 * aux()
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[:10]) / 10, sum(losses[-20:]) / 20


SEQUENCE = {
    "gqa": lambda: GroupedQueryAttention(DIM, 4, 2, pattern=Causal()),
    "moh": lambda: MixtureOfHeads(DIM, 4, shared_heads=1, top_k=2, pattern=Causal()),
    "sqa": lambda: SparseQueryAttention(DIM, 4, query_heads=2, kv_heads=1, pattern=Causal()),
    "mla": lambda: MultiHeadLatentAttention(DIM, 4, pattern=Causal()),
    "cca": lambda: CompressedAttention(DIM, 4, compression=2, pattern=Causal()),
    "ccgqa": lambda: CompressedAttention(DIM, 4, 2, compression=2, pattern=Causal()),
    "single_head": lambda: SingleHeadAttention(DIM, partial_dim=16, qk_dim=16, pattern=Causal()),
    "talking_heads": lambda: TalkingHeadsAttention(DIM, 4, pattern=Causal()),
}


@pytest.mark.parametrize("name", SEQUENCE)
def test_topology_learns_associative_recall(name):
    torch.manual_seed(0)
    mixer = SEQUENCE[name]()
    model = Recall(mixer)
    aux = (lambda: mixer.aux_loss) if isinstance(mixer, MixtureOfHeads) else None
    start, end = train(model, recall_batch, aux)
    assert start > 1.8  # chance: log(8) = 2.08
    assert end < 0.1 * start, f"{name}: loss {start:.3f} -> {end:.3f}"


def test_low_rank_pooling_learns_to_find_the_flagged_token():
    torch.manual_seed(0)
    model = Flagged(LowRankAttention(DIM, 4, rank=4))
    start, end = train(model, flagged_batch, steps=150)
    assert start > 1.8
    assert end < 0.1 * start, f"loss {start:.3f} -> {end:.3f}"
