"""``sae_circuit``: the attention heads of a circuit, found by a discrete sparse autoencoder.

After O'Neill & Bui, 2024, "Sparse Autoencoders Enable Scalable and Reliable Circuit Identification
in Language Models" (arXiv 2405.12522). Positive examples are inputs on which the model does the
task (it predicts the right next token), negative examples are inputs on which it cannot. Every
head's output is captured on both; one sparse autoencoder is trained on them; each (example, head)
output is discretised into an integer code, the index of its largest hidden unit; a head whose
codes on positive examples include codes that never occur on negative examples is engaged in the
task. No head is ablated.

What the abstract fixes: an SAE on attention-head outputs of positive and negative examples,
integer codes, and per head the codes unique to the positive examples. What the authors' code fixes
(github.com/charlieoneill11/sae-circuits: ``src/main.py``, ``src/sae.py``, ``src/train.py``,
``src/node.py``, ``data/data_utils.py``), and is followed here:

* one autoencoder shared by every head of every layer, its inputs the heads' outputs averaged over
  the token positions (``position="mean"``, the data scripts' choice; ``"last"`` also offered);
* ``h = ReLU(W_e (x - b) + b_e)``, ``x_hat = W_d h + b`` with one bias ``b`` tied before the encoder
  and after the decoder (initialised to 0), both weight matrices kept with unit-norm rows (the
  encoder's row of each feature; the decoder's row of each output coordinate, as the code's
  ``ConstrainedUnitNormLinear`` normalises the last axis of a ``(out, in)`` weight): the gradient
  step moves along the sphere and the rows are renormalised after it;
* loss ``mean((x_hat - x)^2) + lambda * mean_(example, head) ||h||_1``, ``lambda = 0.02``; Adam, learning
  rate 1e-3, 500 full-batch steps, 300 features, trained on 10 examples drawn at random from the
  positive and negative sets together, then applied to every example;
* code = ``argmax_f h_f`` (the first index on ties, so an all-zero ``h`` is code 0);
* score of a head = the number of its distinct codes on positive examples that no negative example
  has, optionally divided by the number of its distinct codes on both (``normalize``).

Chosen here, where neither fixes it: the heads' outputs are those ``capture`` records, before the
heads are combined (``Dv`` per head), not each head's ``d_model`` contribution after the output
projection (TransformerLens' ``result``), since the output projection differs between topologies;
the heads are chosen as those scoring above ``threshold`` (0: any code unique to the positives),
at most ``top_k`` of them, whereas the authors rank the heads (a softmax over the scores) and read
the threshold off a known circuit by the best F1; the head-pair (edge) method is not built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capture import capture
from .layers import AnalysisError

POSITIONS = ("mean", "last")


class DiscreteSAE(nn.Module):
    """The authors' sparse autoencoder: ``h = ReLU(W_e (x - b) + b_e)``, ``x_hat = W_d h + b``.

    ``encoder`` ``(features, dim)`` and ``decoder`` ``(dim, features)`` are stored and used with
    unit-norm rows (``renormalize`` after each optimiser step; ``F.normalize`` in the forward makes
    the gradient the one tangent to the sphere). ``bias`` ``(dim,)`` is the tied bias.
    """

    def __init__(self, dim: int, features: int, *, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype))
        self.encoder = nn.Parameter(torch.randn(features, dim, generator=generator, dtype=dtype))
        self.encoder_bias = nn.Parameter(
            (torch.rand(features, generator=generator, dtype=dtype) * 2 - 1) * bound)
        self.decoder = nn.Parameter(torch.randn(dim, features, generator=generator, dtype=dtype))
        self.renormalize()

    def renormalize(self) -> None:
        """Scale every row of ``encoder`` and ``decoder`` to unit norm (in place)."""
        with torch.no_grad():
            for weight in (self.encoder, self.decoder):
                weight.copy_(F.normalize(weight, dim=-1))

    def encode(self, x: Tensor) -> Tensor:
        """Hidden units ``(..., features)`` of inputs ``(..., dim)``."""
        return F.relu(F.linear(x - self.bias, F.normalize(self.encoder, dim=-1), self.encoder_bias))

    def decode(self, h: Tensor) -> Tensor:
        return F.linear(h, F.normalize(self.decoder, dim=-1)) + self.bias

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(h, x_hat)``."""
        h = self.encode(x)
        return h, self.decode(h)

    def loss(self, x: Tensor, sparsity: float) -> Tensor:
        """``mean((x_hat - x)^2) + sparsity * mean ||h||_1`` (the mean over all but the last axis)."""
        h, x_hat = self(x)
        return F.mse_loss(x_hat, x) + sparsity * h.abs().sum(-1).mean()

    def codes(self, x: Tensor) -> Tensor:
        """The integer code of each input: the index of its largest hidden unit (``(...)``, long)."""
        with torch.no_grad():
            return self.encode(x).argmax(-1)


def train_sae(data: Tensor, *, features: int = 300, sparsity: float = 0.02, steps: int = 500,
              lr: float = 1e-3, seed: int = 0) -> DiscreteSAE:
    """A ``DiscreteSAE`` trained on ``data`` ``(..., dim)`` (full batch, Adam, ``steps`` steps,
    rows renormalised after each), initialised from ``seed`` (the global RNG is not touched)."""
    _check_training(features, sparsity, steps, lr)
    if not isinstance(data, Tensor):
        raise AnalysisError(f"data must be a tensor, got {type(data).__name__}")
    if data.dim() < 2 or data.numel() == 0 or not data.is_floating_point():
        raise AnalysisError(f"data must be a non-empty floating (..., dim) tensor, got {tuple(data.shape)} "
                            f"{data.dtype}")
    if not torch.isfinite(data).all():
        raise AnalysisError("data holds NaN or infinite values")
    generator = torch.Generator().manual_seed(seed)
    sae = DiscreteSAE(data.shape[-1], features, generator=generator, dtype=data.dtype).to(data.device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    data = data.detach()
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            sae.loss(data, sparsity).backward()
            optimizer.step()
            sae.renormalize()
    return sae.eval()


@dataclass
class SAECircuit:
    """What ``sae_circuit`` found.

    ``scores`` ``(layers, heads)`` (float64, NaN where a layer has fewer heads than the widest):
    codes unique to the positive examples (a count, or a share with ``normalize``);
    ``negative_scores`` the same for codes unique to the negative examples. ``heads``: the chosen
    heads, ``{layer name: [head indices]}`` (every captured layer, possibly empty).
    ``positive_codes`` ``(examples, layers, heads)`` and ``negative_codes`` (long, -1 as padding).
    ``sae``: the trained autoencoder.
    """

    layers: list[str]
    scores: Tensor
    negative_scores: Tensor
    heads: dict[str, list[int]]
    positive_codes: Tensor
    negative_codes: Tensor
    sae: DiscreteSAE


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AnalysisError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_training(features, sparsity, steps, lr) -> None:
    _check_int("features", features)
    _check_int("steps", steps)
    for name, value, low in (("sparsity", sparsity, None), ("lr", lr, 0.0)):
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value < 0 or (low is not None and value <= low)):
            bound = ">= 0" if low is None else "> 0"
            raise AnalysisError(f"{name} must be a finite number {bound}, got {value!r}")


def head_outputs(model: nn.Module, batches, *, forward: Callable | None = None, layers=None,
                 position: str = "mean") -> tuple[list[str], list[int], Tensor]:
    """Every captured head's output on every example of ``batches`` (a tensor is one batch),
    averaged over the token positions (``"mean"``) or at the last one (``"last"``).

    Returns the layer names, their head counts and ``(examples, total heads, Dv)`` (heads in layer
    order). ``forward(model, batch)`` runs a batch (default ``model(batch)``); each captured layer
    must run exactly once per batch, and all must share one head width."""
    if position not in POSITIONS:
        raise AnalysisError(f"position must be one of {POSITIONS}, got {position!r}")
    run = forward if forward is not None else (lambda m, batch: m(batch))
    batches = [batches] if isinstance(batches, Tensor) else list(batches)
    names, counts, rows = None, None, []
    for batch in batches:
        with torch.no_grad(), capture(model, layers, weights=False, outputs=True) as rec:
            run(model, batch)
        per_layer = []
        for name in rec.layers:
            calls = rec.calls[name]
            if len(calls) != 1:
                raise AnalysisError(f"layer {name!r} ran {len(calls)} times on one batch; sae_circuit needs "
                                    "exactly one attention call per layer and batch")
            out = calls[0].out  # (B, h, L, Dv)
            per_layer.append(out.mean(2) if position == "mean" else out[:, :, -1])
        widths = {o.shape[-1] for o in per_layer}
        sizes = {o.shape[0] for o in per_layer}
        if len(widths) > 1 or len(sizes) > 1:
            raise AnalysisError(f"the captured layers differ in head width {sorted(widths)} or batch size "
                                f"{sorted(sizes)}; one autoencoder needs one head width (select layers)")
        names = names or list(rec.layers)
        if counts is None:
            counts = [o.shape[1] for o in per_layer]
        rows.append(torch.cat(per_layer, dim=1))
    if not rows or sum(r.shape[0] for r in rows) == 0:
        raise AnalysisError("no examples: pass at least one non-empty batch")
    data = torch.cat(rows, dim=0)
    data = data.double() if data.dtype == torch.float64 else data.float()
    if not torch.isfinite(data).all():
        raise AnalysisError("the head outputs hold NaN or infinite values")
    return names, counts, data


def unique_codes(positive: Tensor, negative: Tensor, normalize: bool = False) -> tuple[Tensor, Tensor]:
    """Per column (head) of ``positive`` ``(N+, heads)`` and ``negative`` ``(N-, heads)`` codes: the
    number of distinct codes only the positives have, and only the negatives have (float64), each
    divided by the number of distinct codes of the column when ``normalize``."""
    if positive.dim() != 2 or negative.dim() != 2 or positive.shape[1] != negative.shape[1]:
        raise AnalysisError(f"codes must be (examples, heads) with the same heads, got {tuple(positive.shape)} "
                            f"and {tuple(negative.shape)}")
    pos_only = torch.zeros(positive.shape[1], dtype=torch.float64)
    neg_only = torch.zeros(positive.shape[1], dtype=torch.float64)
    for j in range(positive.shape[1]):
        pos, neg = set(positive[:, j].tolist()), set(negative[:, j].tolist())
        total = len(pos | neg) if normalize else 1
        pos_only[j], neg_only[j] = len(pos - neg) / total, len(neg - pos) / total
    return pos_only, neg_only


def sae_circuit(model: nn.Module, positive, negative, *, forward: Callable | None = None, layers=None,
                position: str = "mean", features: int = 300, sparsity: float = 0.02, steps: int = 500,
                lr: float = 1e-3, train_examples: int | None = 10, normalize: bool = False,
                threshold: float = 0.0, top_k: int | None = None, seed: int = 0) -> SAECircuit:
    """The heads of ``model`` engaged in a task, by the codes of a discrete sparse autoencoder that
    occur on the task's positive examples and never on its negative ones (O'Neill & Bui, 2024; the
    module docstring says what follows the authors' code and what is chosen here).

    Args:
        model: a model built from multihead modules, or a Hugging Face model running
            ``attn_implementation="multihead"``.
        positive, negative: batches (an iterable, or one tensor) of inputs on which the model does
            the task and on which it cannot; ``forward(model, batch)`` runs one (default
            ``model(batch)``).
        layers: which attention layers (as ``capture``; None: all). They must share one head width.
        position: ``"mean"`` (average over token positions, the authors' data) or ``"last"``.
        features, sparsity, steps, lr: the autoencoder (300 hidden units, L1 weight 0.02, 500
            full-batch Adam steps at 1e-3, the authors' configuration).
        train_examples: how many examples, drawn at random from both sets, train it (None: all).
        normalize: divide each head's count by its number of distinct codes (the authors' option;
            their default is the raw count, which grows with a head's variety of codes: in the tests,
            negatives that are minimal pairs of the positives but also differ slightly elsewhere are
            separated by the share and not by the count).
        threshold, top_k: a head is chosen when its score exceeds ``threshold``; ``top_k`` keeps at
            most that many, the highest scores first (ties by layer and head order).
        seed: the autoencoder's initialisation and the draw of training examples.

    Returns an ``SAECircuit`` (scores per head, the chosen heads, the codes, the autoencoder).
    """
    _check_training(features, sparsity, steps, lr)
    if train_examples is not None:
        _check_int("train_examples", train_examples)
    if top_k is not None:
        _check_int("top_k", top_k)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise AnalysisError(f"threshold must be a finite number, got {threshold!r}")
    names, counts, pos = head_outputs(model, positive, forward=forward, layers=layers, position=position)
    names_neg, _, neg = head_outputs(model, negative, forward=forward, layers=layers, position=position)
    if names_neg != names or neg.shape[1:] != pos.shape[1:]:
        raise AnalysisError("the positive and negative examples ran different layers or heads")

    data = torch.cat([pos, neg], dim=0)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.shape[0], generator=generator)
    train = data[order[:train_examples]] if train_examples is not None else data
    sae = train_sae(train, features=features, sparsity=sparsity, steps=steps, lr=lr, seed=seed)
    pos_codes, neg_codes = sae.codes(pos).cpu(), sae.codes(neg).cpu()
    pos_only, neg_only = unique_codes(pos_codes, neg_codes, normalize)

    width = max(counts)
    scores = torch.full((len(names), width), float("nan"), dtype=torch.float64)
    negative_scores = scores.clone()
    codes = [torch.full((x.shape[0], len(names), width), -1, dtype=torch.long) for x in (pos, neg)]
    where, start = [], 0
    for i, count in enumerate(counts):
        scores[i, :count] = pos_only[start:start + count]
        negative_scores[i, :count] = neg_only[start:start + count]
        codes[0][:, i, :count] = pos_codes[:, start:start + count]
        codes[1][:, i, :count] = neg_codes[:, start:start + count]
        where += [(i, h) for h in range(count)]
        start += count
    above = [j for j in range(len(where)) if pos_only[j] > threshold]
    ranked = sorted(above, key=lambda j: -float(pos_only[j]))  # stable: ties in layer and head order
    chosen = {name: [] for name in names}
    for j in ranked[:top_k] if top_k is not None else ranked:
        layer, head = where[j]
        chosen[names[layer]].append(head)
    chosen = {name: sorted(heads) for name, heads in chosen.items()}
    return SAECircuit(layers=names, scores=scores, negative_scores=negative_scores, heads=chosen,
                      positive_codes=codes[0], negative_codes=codes[1], sae=sae)
