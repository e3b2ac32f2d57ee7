"""Block Transformer: global attention only between block embeddings, local attention inside blocks,
causal end to end; it trains on a task that needs both levels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multihead.errors import ShapeError
from multihead.models.block_lm import BlockTransformerLM
from multihead.patterns import BlockLocal, Causal


def test_every_prediction_sees_only_earlier_tokens():
    torch.manual_seed(0)
    model = BlockTransformerLM(11, 16, 2, block=4, max_len=32)
    tokens = torch.randint(11, (2, 24))
    logits = model(tokens)
    for t in (0, 3, 4, 9, 23):
        changed = tokens.clone()
        changed[:, t:] = torch.randint(11, (2, 24 - t))
        torch.testing.assert_close(model(changed)[:, :t + 1], logits[:, :t + 1])
        if t < 23:
            assert not torch.allclose(model(changed)[:, t + 1:], logits[:, t + 1:])


def test_token_decoder_attends_within_blocks_and_block_decoder_between_blocks():
    model = BlockTransformerLM(11, 16, 2, block=4, max_len=32)
    local = model.token_decoder[0].attention.pattern.dense_mask(12, 12)[0, 0]
    want = (BlockLocal(4) & Causal()).dense_mask(12, 12)[0, 0]
    assert torch.equal(local, want) and not local[4, :4].any()  # no token sees an earlier block
    assert torch.equal(model.block_decoder[0].attention.pattern.dense_mask(3, 3)[0, 0],
                       torch.ones(3, 3, dtype=torch.bool).tril())


def test_the_first_token_of_a_block_is_predicted_from_its_context_alone():
    """Changing a block's earlier tokens moves its first prediction only through the block decoder:
    with the block decoder's output fixed, the first prediction of block b is a function of context_b."""
    torch.manual_seed(0)
    model = BlockTransformerLM(11, 16, 2, block=4, max_len=32)
    tokens = torch.randint(11, (1, 12))
    ctx = model.contexts(tokens)
    x = ctx[:, 1] + model.local_position.weight[0]  # the first position of block 1 alone (pattern: itself)
    for layer in model.token_decoder:
        x = layer(x.view(1, 1, -1)).view(1, -1)
    torch.testing.assert_close(model(tokens)[:, 4], model.head(model.norm(x)))


def test_block_transformer_learns_a_task_that_needs_both_levels():
    """Each block repeats the previous block's tokens in the same order: the first tokens need the
    global (block) context, the later ones can also read their own block."""
    torch.manual_seed(0)
    model = BlockTransformerLM(8, 32, 4, block=4, block_depth=2, token_depth=2, max_len=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(400):
        first = torch.randint(8, (32, 4), generator=gen)
        tokens = first.repeat(1, 4)
        loss = F.cross_entropy(model(tokens)[:, 4:].reshape(-1, 8), tokens[:, 4:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    print(f"block transformer copy: loss {start:.3f} -> {end:.3f}")
    assert end < 0.5 * start


def test_block_transformer_errors():
    model = BlockTransformerLM(8, 16, 2, block=4, max_len=16)
    with pytest.raises(ShapeError, match="multiple of block"):
        model(torch.randint(8, (1, 6)))
    with pytest.raises(ShapeError, match="integer"):
        model(torch.randn(1, 8))
    with pytest.raises(ShapeError, match="max_len"):
        BlockTransformerLM(8, 16, 2, block=4, max_len=18)
