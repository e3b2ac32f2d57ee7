"""``TransformerLM``: a small causal language model around any attention variant, for the arena."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..cache import CacheError, ModelCache
from ..errors import ShapeError
from ..patterns import Causal
from .block import TransformerBlock


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapeError(f"{name} must be a positive integer, got {value!r}")
    return value


def build_attention(attention: str | Callable[[int, int, int], nn.Module], dim: int, heads: int,
                    seq_len: int) -> nn.Module:
    """An attention module from a catalog name or a builder ``(dim, heads, seq_len) -> module``."""
    from .. import catalog

    if isinstance(attention, str):
        try:
            attention = catalog.get(attention).build
        except KeyError as error:
            raise ShapeError(f"attention: {error.args[0]}") from None
    if not callable(attention):
        raise ShapeError(f"attention must be a catalog name or a builder (dim, heads, seq_len) -> module, "
                         f"got {type(attention).__name__}")
    return attention(dim, heads, seq_len)


def make_causal(module: nn.Module) -> nn.Module:
    """Restrict ``module`` to causal attention: its pattern (and that of every submodule that has
    one) intersected with ``Causal()``. A module that is causal by construction says so (a true
    ``causal`` attribute: the causal linear forms) and is kept as it is; one whose token mixing its
    ``pattern`` does not govern (``pattern_restricts_mixing = False``: vision blocks build patterns
    per grid, the recurrent forms follow their own ``causal``), or that has no pattern at all, gives
    a ``ShapeError``."""
    if getattr(module, "causal", None) is True:
        return module
    patterned = [m for m in module.modules() if hasattr(m, "pattern")]
    own = [m for m in module.modules() if not getattr(m, "pattern_restricts_mixing", True)]
    if own or not patterned:
        name = type(own[0] if own else module).__name__
        raise ShapeError(f"{name} mixes tokens by no pattern that Causal() can restrict; build it causal, "
                         f"or pass causal=False")
    for m in patterned:
        m.pattern = Causal() if m.pattern is None else m.pattern & Causal()
    return module


class TransformerLM(nn.Module):
    """A decoder-only language model: token and learned position embeddings, ``depth`` pre-norm
    ``TransformerBlock``s around the chosen attention, a final norm and a tied output projection.

    Standard GPT-2-style model; what changes between variants is only the attention, given as a
    catalog name (``"sliding_window"``) or a builder ``(dim, heads, seq_len) -> module`` called
    with ``max_len``. With ``causal`` (the default) every block's pattern is intersected with
    ``Causal()``, so each position sees only itself and earlier tokens whatever the variant.

    Args:
        vocab: vocabulary size.
        dim, depth, heads: width, number of blocks, attention heads.
        attention: catalog name or builder.
        max_len: the longest sequence (positions learned up to it; the attention built for it).
        causal: make every block's attention causal.
        mlp_ratio, dropout: of the blocks' MLPs.
    """

    def __init__(self, vocab: int, dim: int, depth: int, heads: int,
                 attention: str | Callable[[int, int, int], nn.Module] = "mha", max_len: int = 512,
                 causal: bool = True, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.vocab, self.dim = _positive("vocab", vocab), _positive("dim", dim)
        self.max_len = _positive("max_len", max_len)
        _positive("depth", depth)
        _positive("heads", heads)
        self.token = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_len, dim)
        blocks = []
        for _ in range(depth):
            module = build_attention(attention, dim, heads, max_len)
            blocks.append(TransformerBlock(dim, make_causal(module) if causal else module, mlp_ratio, dropout))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.token.weight
        nn.init.normal_(self.token.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, tokens: Tensor, cache: ModelCache | None = None) -> Tensor:
        """Logits ``(batch, length, vocab)`` for ``tokens`` ``(batch, length)``, ``length <= max_len``.

        With ``cache`` (``make_cache()``), ``tokens`` continue the sequence the cache holds: their
        positions start at ``cache.length`` and each block attends over its cached keys."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ShapeError(f"tokens must be an integer tensor (batch, length), got {shape}")
        start = 0
        if cache is not None:
            if not isinstance(cache, ModelCache) or len(cache) != len(self.blocks):
                raise CacheError(f"cache must be this model's make_cache() (one cache per block, {len(self.blocks)}), "
                                 f"got {type(cache).__name__}" + (f" of {len(cache)}" if isinstance(cache, list) else ""))
            start = cache.length
        length = start + tokens.shape[1]
        if length > self.max_len:
            raise ShapeError(f"tokens reach position {length} > max_len {self.max_len} (the learned positions); "
                             f"build the model with max_len >= {length}")
        positions = torch.arange(start, length, device=tokens.device)
        x = self.token(tokens) + self.position(positions)
        for i, block in enumerate(self.blocks):
            x = block(x) if cache is None else block(x, cache=cache[i])
        return self.head(self.norm(x))

    def make_cache(self, capacity: int | None = None) -> ModelCache:
        """One decoding cache per block: ``KVCache.for_pattern`` of the block's attention (a rolling
        window with its sinks for local patterns; every key, up to ``capacity``, otherwise), or the
        module's own cache type (``LatentCache`` for MLA). Modules that cannot decode raise
        ``CacheError`` naming why."""
        return ModelCache(cache_for(block.attention, capacity) for block in self.blocks)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 *, use_cache: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Continue ``prompt`` ``(batch, length)`` by ``max_new_tokens`` tokens; returns
        ``(batch, length + max_new_tokens)``.

        Each token is drawn from ``softmax(logits / temperature)`` restricted to the ``top_k`` most
        likely (all with None); ``temperature=0`` is greedy. With ``use_cache`` the prompt runs once
        and every new token is one decoding step against the blocks' caches (``make_cache``);
        without, the whole sequence is recomputed for every token (the same tokens, slower)."""
        if not isinstance(prompt, Tensor) or prompt.dim() != 2 or prompt.shape[1] < 1 or \
                prompt.dtype not in (torch.long, torch.int):
            raise ShapeError(f"prompt must be an integer tensor (batch, length >= 1), got "
                             f"{tuple(prompt.shape) if isinstance(prompt, Tensor) else type(prompt).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ShapeError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
            raise ShapeError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ShapeError(f"top_k must be a positive integer or None, got {top_k!r}")
        total = prompt.shape[1] + max_new_tokens
        if total > self.max_len:
            raise ShapeError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                             f"max_len {self.max_len}; generate fewer tokens or build the model with a larger max_len")
        tokens = prompt
        if max_new_tokens == 0:
            return tokens
        cache = self.make_cache(capacity=total) if use_cache else None
        logits = self(prompt, cache=cache)[:, -1]
        for step in range(max_new_tokens):
            chosen = sample(logits, temperature, top_k, generator)
            tokens = torch.cat([tokens, chosen[:, None]], dim=1)
            if step + 1 < max_new_tokens:
                logits = self(chosen[:, None], cache=cache)[:, -1] if use_cache else self(tokens)[:, -1]
        return tokens


def sample(logits: Tensor, temperature: float, top_k: int | None,
           generator: torch.Generator | None = None) -> Tensor:
    """Next tokens ``(batch,)`` from ``logits`` ``(batch, vocab)``: the argmax when ``temperature``
    is 0, else a draw from ``softmax(logits / temperature)`` over the ``top_k`` largest."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


def cache_for(module: nn.Module, capacity: int | None = None):
    """The decoding cache of one attention module: ``module.new_cache()`` (``KVCache.for_pattern``
    of its pattern for ``MultiHeadAttention`` and its topologies, ``LatentCache`` for MLA), after
    ``module.cache_refusal()`` said nothing against it."""
    parameters = inspect.signature(module.forward).parameters.values()
    takes_cache = any(p.name == "cache" or p.kind is p.VAR_KEYWORD for p in parameters)
    reason = module.cache_refusal() if hasattr(module, "cache_refusal") else None
    if reason is None and not takes_cache:
        reason = "its forward takes no cache"
    if reason is None and hasattr(module, "new_cache"):
        return module.new_cache(capacity=capacity)
    reason = reason or "it defines no decoding cache (new_cache)"
    raise CacheError(f"{type(module).__name__} cannot decode with a cache: {reason}; generate with use_cache=False")
