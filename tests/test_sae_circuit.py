"""multihead.analysis.sae_circuit: discrete sparse autoencoders on head outputs (O'Neill & Bui, 2024)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from multihead.analysis import AnalysisError, DiscreteSAE, capture, sae_circuit, train_sae
from multihead.analysis.sae_circuit import head_outputs, unique_codes
from multihead.nn import MultiHeadAttention

DIM, HEADS, WIDTH = 32, 4, 8
FLAG = DIM - 1  # the input channel that tells positive (+1) from negative (-1) examples
PLANTED = {"attentions.0": [1], "attentions.1": [2]}


class Residual(nn.Module):
    """Attention layers with residual connections and nothing else (no norm, no MLP), so a channel
    that no head reads stays out of every head's output."""

    def __init__(self, layers=2):
        super().__init__()
        self.attentions = nn.ModuleList(MultiHeadAttention(DIM, HEADS, backend="reference")
                                        for _ in range(layers))

    def forward(self, x):
        for attention in self.attentions:
            x = x + attention(x)
        return x


def planted_model(seed=0):
    """Every head ignores the flag channel except head 1 of layer 0 and head 2 of layer 1, whose
    values read it (so their outputs shift by +-u); head 1 of layer 0 writes nothing back."""
    torch.manual_seed(seed)
    model = Residual().double().eval()
    with torch.no_grad():
        for layer, attention in enumerate(model.attentions):
            for proj in (attention.q_proj, attention.k_proj, attention.v_proj):
                proj.weight[:, FLAG] = 0.0
            for head in PLANTED[f"attentions.{layer}"]:
                rows = slice(head * WIDTH, (head + 1) * WIDTH)
                attention.v_proj.weight[rows, FLAG] = 3.0 * torch.randn(WIDTH, dtype=torch.float64)
        model.attentions[0].out_proj.weight[:, 1 * WIDTH:2 * WIDTH] = 0.0
    return model


def examples(flag, n=12, tokens=6, seed=1):
    x = torch.randn(n, tokens, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[..., FLAG] = flag
    return x


# -- the autoencoder against a transcription of the authors' ------------------------------------


def transcribed_forward(sae, x):
    """h = ReLU(W_e (x - b) + b_e), x_hat = W_d h + b with each weight row divided by its norm."""
    W_e = sae.encoder / sae.encoder.pow(2).sum(1, keepdim=True).sqrt()
    W_d = sae.decoder / sae.decoder.pow(2).sum(1, keepdim=True).sqrt()
    h = torch.clamp(torch.einsum("fd,...d->...f", W_e, x - sae.bias) + sae.encoder_bias, min=0)
    return h, torch.einsum("df,...f->...d", W_d, h) + sae.bias


def test_sae_loss_and_codes_match_a_transcription():
    data = torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sae = train_sae(data, features=10, steps=20, lr=1e-2, seed=3)
    with torch.no_grad():
        sae.bias.copy_(torch.randn(6, dtype=torch.float64))  # a non-zero tied bias
    h, x_hat = transcribed_forward(sae, data)
    got_h, got_x = sae(data)
    torch.testing.assert_close(got_h, h)
    torch.testing.assert_close(got_x, x_hat)
    # loss: mean squared error over every element + lambda * mean over (example, head) of ||h||_1
    mse = ((x_hat - data) ** 2).sum() / data.numel()
    l1 = sum(h[i, j].abs().sum() for i in range(5) for j in range(3)) / 15
    torch.testing.assert_close(sae.loss(data, 0.02), mse + 0.02 * l1)
    # code: the first index of the largest hidden unit, for every (example, head)
    codes = sae.codes(data)
    for i in range(5):
        for j in range(3):
            row = h[i, j].tolist()
            assert codes[i, j].item() == row.index(max(row))
    dead = copy.deepcopy(sae)
    with torch.no_grad():
        dead.encoder_bias.fill_(-1e6)
    assert (dead.encode(data) == 0).all() and (dead.codes(data) == 0).all()  # an all-zero h is code 0
    assert (h > 0).any() and (h == 0).any()


def test_training_step_is_the_authors_projected_gradient_then_renormalisation():
    """The steps of ``train_sae`` equal the scheme of the authors' ConstrainedUnitNormLinear from the
    same start: forward with the unit-norm weights, remove each row's gradient component along the
    row, Adam step, scale the rows back to unit norm."""
    data = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theirs = DiscreteSAE(5, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ours = train_sae(data, features=12, sparsity=0.02, steps=3, lr=0.05, seed=4)

    opt = torch.optim.Adam(theirs.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        h = torch.relu((data - theirs.bias) @ theirs.encoder.T + theirs.encoder_bias)
        x_hat = h @ theirs.decoder.T + theirs.bias
        loss = ((x_hat - data) ** 2).mean() + 0.02 * h.abs().sum(1).mean()
        loss.backward()
        for w in (theirs.encoder, theirs.decoder):
            unit = w.detach() / w.detach().norm(dim=1, keepdim=True)
            w.grad -= (w.grad * w.detach()).sum(1, keepdim=True) * unit
        opt.step()
        with torch.no_grad():
            for w in (theirs.encoder, theirs.decoder):
                w /= w.norm(dim=1, keepdim=True)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.decoder.norm(dim=1), torch.ones(5, dtype=torch.float64))


def test_unique_codes_are_set_differences_per_head():
    pos = torch.tensor([[0, 5], [1, 5], [2, 5], [2, 6]])
    neg = torch.tensor([[1, 5], [3, 7], [3, 7]])
    only_pos, only_neg = unique_codes(pos, neg)
    assert only_pos.tolist() == [2.0, 1.0]  # {0, 2}; {6}
    assert only_neg.tolist() == [1.0, 1.0]  # {3}; {7}
    share, _ = unique_codes(pos, neg, normalize=True)
    assert share.tolist() == [2 / 4, 1 / 3]


# -- circuits planted by setting weights ------------------------------------------------------------


def test_head_outputs_are_the_captured_outputs_averaged_over_tokens():
    model, x = planted_model(), examples(1.0, n=3)
    names, counts, data = head_outputs(model, [x[:2], x[2:]])
    with torch.no_grad(), capture(model, weights=False, outputs=True) as rec:
        model(x)
    want = torch.cat([rec[name].out.mean(2) for name in names], dim=1)
    assert names == ["attentions.0", "attentions.1"] and counts == [4, 4]
    torch.testing.assert_close(data, want)
    _, _, last = head_outputs(model, x, position="last")
    torch.testing.assert_close(last, torch.cat([rec[name].out[:, :, -1] for name in names], dim=1))


def test_finds_exactly_the_planted_heads():
    """Positive and negative examples differ only in the flag channel: the heads that do not read it
    give the same outputs, so the same codes, and score 0; the planted heads' codes separate."""
    model = planted_model()
    found = sae_circuit(model, [examples(1.0)], [examples(-1.0)])
    assert found.heads == PLANTED
    assert found.layers == ["attentions.0", "attentions.1"]
    assert found.scores.shape == (2, 4) and found.positive_codes.shape == (12, 2, 4)
    others = torch.ones(2, 4, dtype=torch.bool)
    others[0, 1] = others[1, 2] = False
    assert (found.scores[others] == 0).all() and (found.negative_scores[others] == 0).all()
    assert found.scores[0, 1] > 0 and found.scores[1, 2] > 0
    assert torch.equal(found.positive_codes[:, others], found.negative_codes[:, others])


@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_ranks_the_planted_heads_first_when_the_pairs_also_differ_elsewhere(noise):
    """Negatives as minimal pairs of the positives (the authors' counterfactual prompts) that also
    differ a little in every other channel: every head's codes now vary between the sets, and the
    planted heads hold the largest share of codes unique to the positives (``normalize``); ``top_k``
    picks them. (The raw count does not separate them here: it grows with a head's variety of codes.)"""
    model, pos = planted_model(), examples(1.0)
    neg = pos + noise * torch.randn(pos.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    neg[..., FLAG] = -1.0
    found = sae_circuit(model, pos, neg, normalize=True, top_k=2)
    assert found.heads == PLANTED
    ranked = found.scores.flatten().sort(descending=True)
    assert set(ranked.indices[:2].tolist()) == {1, 6} and ranked.values[1] >= 2 * ranked.values[2] > 0


def test_layers_selection_threshold_and_normalize():
    model = planted_model()
    pos, neg = examples(1.0), examples(-1.0)
    found = sae_circuit(model, pos, neg, layers=[1], normalize=True)
    assert found.heads == {"attentions.1": [2]} and found.scores.shape == (1, 4)
    assert 0 < found.scores[0, 2] <= 1
    none = sae_circuit(model, pos, neg, threshold=1e9)
    assert none.heads == {"attentions.0": [], "attentions.1": []}


def test_errors():
    model, pos, neg = planted_model(), examples(1.0), examples(-1.0)
    with pytest.raises(AnalysisError, match="position"):
        sae_circuit(model, pos, neg, position="first")
    with pytest.raises(AnalysisError, match="features"):
        sae_circuit(model, pos, neg, features=0)
    with pytest.raises(AnalysisError, match="sparsity"):
        sae_circuit(model, pos, neg, sparsity=-1.0)
    with pytest.raises(AnalysisError, match="lr"):
        sae_circuit(model, pos, neg, lr=0.0)
    with pytest.raises(AnalysisError, match="top_k"):
        sae_circuit(model, pos, neg, top_k=0)
    with pytest.raises(AnalysisError, match="threshold"):
        sae_circuit(model, pos, neg, threshold=float("nan"))
    with pytest.raises(AnalysisError, match="no examples"):
        sae_circuit(model, [], neg)
    with pytest.raises(AnalysisError, match="NaN"):
        sae_circuit(model, pos, neg.clone().fill_(float("nan")))
    with pytest.raises(AnalysisError, match="2 times"):
        sae_circuit(model, pos, neg, forward=lambda m, b: (m(b), m(b)))
    with pytest.raises(AnalysisError, match="no attention layer"):
        sae_circuit(nn.Linear(3, 3), pos, neg)
    wide = Residual()
    wide.attentions[1] = MultiHeadAttention(DIM, 2, head_dim=4)
    with pytest.raises(AnalysisError, match="head width"):
        sae_circuit(wide.double(), pos, neg)
    with pytest.raises(AnalysisError, match="data must be"):
        train_sae(torch.zeros(3, dtype=torch.long))
