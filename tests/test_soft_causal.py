"""iLLaMA's soft causal mask against its formula (forward and gradients, every backend), the schedule,
the post-sequence class token, training."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_backends_match, gratings_losses, on_backend

from multihead.errors import ShapeError
from multihead.models import VisionTransformer
from multihead.models.lm import make_causal
from multihead.nn.soft_causal import SoftCausalAttention, set_soft_mask_rate, soft_mask_rate
from multihead.patterns import Causal
from multihead.scores import SoftCausal


def soft_masked(module, x, rate):
    """iLLaMA's mask M = rate * 1 + (1 - rate) * tril on exp(s), rows normalised, written out."""
    b, n, _ = x.shape
    q, k, v = (proj(x).view(b, n, module.heads, -1).transpose(1, 2)
               for proj in (module.q_proj, module.k_proj, module.v_proj))
    mask = rate + (1 - rate) * torch.ones(n, n, dtype=x.dtype).tril()
    weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).exp() * mask
    weights = weights / weights.sum(-1, keepdim=True)
    return module.out_proj((weights @ v).transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_soft_causal_attention_is_the_blended_mask_on_every_backend(rate):
    torch.manual_seed(0)
    module = SoftCausalAttention(16, 4, soft_mask_rate=rate).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    assert_backends_match(on_backend(module, x), soft_masked(module, x, rate), [x, *module.parameters()],
                          backends=("reference", "sdpa", "blocksparse", "auto"))


def test_soft_causal_score_is_log_rate_on_future_keys():
    logits = SoftCausal(0.25).apply_dense(torch.zeros(1, 1, 3, 3), 3)[0, 0]
    want = torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 0]]) * math.log(0.25)
    torch.testing.assert_close(logits, want)


def test_schedule_decays_linearly_to_zero_at_the_cutoff():
    assert [soft_mask_rate(s, 5) for s in range(7)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]
    assert soft_mask_rate(1, 3, start=0.5) == 0.25
    assert soft_mask_rate(0, 0) == 0.0


def test_rate_zero_is_causal_and_make_causal_sets_it():
    torch.manual_seed(0)
    module = SoftCausalAttention(16, 2, soft_mask_rate=0.5)
    assert module.pattern is None and not module.causal
    assert make_causal(module) is module and module.soft_mask_rate == 0.0 and module.pattern == Causal()
    x = torch.randn(1, 8, 16)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(1, 3, 16)
    torch.testing.assert_close(module(x2)[:, :5], module(x)[:, :5])


def test_post_class_token_reads_every_image_token_under_causal_attention():
    torch.manual_seed(0)
    model = VisionTransformer(8, 2, 16, 1, 2, attention="illama", in_channels=1, num_classes=3,
                              class_token="post").eval()
    images = torch.randn(1, 1, 8, 8)
    changed = images.clone()
    changed[..., 0, 0] += 1.0  # the first patch: every later token, the class token included, sees it
    assert not torch.allclose(model(images), model(changed))
    assert set_soft_mask_rate(model, 0.4) == 1


def test_illama_vit_trains_through_the_soft_mask_schedule():
    torch.manual_seed(0)
    model = VisionTransformer(16, 4, 32, 2, 4, attention="illama", in_channels=1, num_classes=4,
                              class_token="post")
    steps, cutoff = 60, 20
    rates = iter([soft_mask_rate(s, cutoff) for s in range(steps)])

    class Scheduled(torch.nn.Module):  # sets the rate of this step, then runs the model
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images):
            set_soft_mask_rate(self.model, next(rates))
            return self.model(images)

    losses = gratings_losses(Scheduled(), steps)
    assert model.blocks[0][0].attention.soft_mask_rate == 0.0
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


def test_soft_causal_errors():
    with pytest.raises(ShapeError, match="soft_mask_rate"):
        SoftCausalAttention(16, 2, soft_mask_rate=1.5)
    with pytest.raises(ShapeError, match="pattern"):
        SoftCausalAttention(16, 2, pattern=Causal())
    with pytest.raises(ShapeError, match="rate"):
        SoftCausal(0.0)
    with pytest.raises(ShapeError, match="class_token"):
        VisionTransformer(8, 2, 16, 1, 2, class_token="first")
    with pytest.raises(ShapeError, match="cutoff"):
        soft_mask_rate(0, -1)
