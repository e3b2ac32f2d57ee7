"""Look inside the heads: capture per-head attention, measure it, rank heads, find circuit heads,
prune them.

Works on models built from multihead modules and on Hugging Face models running
``attn_implementation="multihead"`` (``multihead.integrations.hf``), whatever backend ran.
"""

from .capture import LayerRecord, Recording, capture, recompute_weights
from .importance import ablation_importance, gradient_importance, head_mask
from .layers import AnalysisError, add_head_hook, attention_layers, head_count
from .metrics import (attention_distance, diagonal_score, entropy, high_norm_key_share, positional_score,
                      previous_token_score, sink_score, special_token_attention)
from .prune import prune
from .sae_circuit import DiscreteSAE, SAECircuit, sae_circuit, train_sae
from .summary import head_metrics

__all__ = ["capture", "Recording", "LayerRecord", "recompute_weights", "attention_layers", "head_count",
           "add_head_hook", "AnalysisError", "entropy", "attention_distance", "special_token_attention",
           "sink_score", "high_norm_key_share", "diagonal_score", "previous_token_score", "positional_score",
           "head_metrics", "head_mask", "ablation_importance", "gradient_importance", "prune",
           "sae_circuit", "SAECircuit", "DiscreteSAE", "train_sae"]
