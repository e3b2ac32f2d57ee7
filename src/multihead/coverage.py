"""Which papers of the seed catalogue multihead covers, and how (``docs/coverage.md`` is made from this).

The seed catalogue (``shared/reference/seed-papers.md``, "Catalogue by family") lists 134 papers that
describe a concrete attention mechanism, tool, analysis or benchmark. Every one has a ``Row`` here:

- ``implemented``: ``offers`` names the objects that carry the paper's mechanism (dotted paths under
  ``multihead``, or ``variant:<name>`` for a catalog variant) and ``tests`` the tests that check them
  against the paper's formula (``tests/<file>.py::<test function>``); ``note`` says what part of
  the paper is left out, if any;
- ``out of scope``: ``reason`` is one of ``REASONS`` and ``note`` says why;
- ``missing``: not built yet; ``note`` says what it would take (``offers`` may name pieces that
  exist toward it).

``tests/test_coverage.py`` checks that every name resolves to a real object, every test exists,
the rows are exactly the seed catalogue, and ``docs/coverage.md`` is this data rendered.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field

IMPLEMENTED, OUT_OF_SCOPE, MISSING = "implemented", "out of scope", "missing"
STATUSES = (IMPLEMENTED, OUT_OF_SCOPE, MISSING)

#: The families of the seed catalogue, by their number there (9 is the application-only list).
FAMILIES = {
    1: "Head topology",
    2: "Sparsity / locality pattern",
    3: "Multi-scale / cross attention",
    4: "Score / position modifiers",
    5: "Linear / recurrent / memory / SSM-hybrid attention",
    6: "Kernels and systems",
    7: "Analysis, interpretability and theory",
    8: "Benchmarks",
    10: "Conv-attention hybrids and alternatives to attention",
    11: "Attention control in generative models",
    12: "Token reduction / selection around attention",
    13: "Compression, adaptation and merging",
}

#: Why a row is out of scope for a library of attention mechanisms.
REASONS = {
    "recipe": "a training recipe (the attention itself is unchanged)",
    "architecture": "a whole-model architecture with no attention change",
    "theory": "pure theory or an empirical study, no mechanism to build",
    "application": "application-only (the attention is plain, or its form is not given)",
    "not-attention": "not an attention mechanism (a convolution, SSM, MLP or quantised matmul)",
    "hardware": "a hardware or cluster system beyond one process",
}


@dataclass(frozen=True)
class Row:
    family: int
    paper: str
    status: str
    offers: tuple[str, ...] = ()
    tests: tuple[str, ...] = ()
    note: str = ""
    reason: str | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"Row.family must be one of {sorted(FAMILIES)}, got {self.family!r}")
        if self.status not in STATUSES:
            raise ValueError(f"Row.status must be one of {STATUSES}, got {self.status!r}")
        for name in ("offers", "tests"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))


def _i(family, paper, offers, tests, note=""):
    return Row(family, paper, IMPLEMENTED, tuple(offers), tuple(tests), note)


def _o(family, paper, reason, note, offers=()):
    return Row(family, paper, OUT_OF_SCOPE, tuple(offers), (), note, reason)


def _m(family, paper, note, offers=()):
    return Row(family, paper, MISSING, tuple(offers), (), note)


ROWS: tuple[Row, ...] = (
    # 1. Head topology
    _i(1, "MoH: Multi-Head Attention as Mixture-of-Head Attention",
       ["heads.MixtureOfHeads", "variant:moh"],
       ["test_heads.py::test_moh_routes_top_k_per_token_with_two_stage_weights",
        "test_heads.py::test_moh_with_every_head_on_and_equal_weights_is_mha"]),
    _i(1, "SHViT: Single-Head Vision Transformer", ["heads.SingleHeadAttention", "variant:single_head"],
       ["test_heads.py::test_single_head_attends_over_the_partial_channels_only"],
       "the single-head module; the conv stages and stem are a model design"),
    _i(1, "ComplexFormer (Complex Multi-Head Attention, CMHA)",
       ["scores.ComplexRotation", "variant:complex_rotation"],
       ["test_complex_rotation.py::test_attention_with_rotations_matches_the_formula_on_every_backend",
        "test_complex_rotation.py::test_rotated_dot_product_is_the_complex_form"]),
    _i(1, "MQSA-TED: Multi-Query Self-Attention for sequential recommendation",
       ["nn.long_short_query.LongShortQueryAttention", "nn.long_short_query.window_mean",
        "variant:long_short_query"],
       ["test_long_short_query.py::test_long_and_short_queries_mix_two_causal_attentions",
        "test_long_short_query.py::test_long_short_query_is_causal_and_trains"],
       "the L-query (window mean) and 1-query attentions mixed by alpha; the transition-aware embedding "
       "distillation is a training recipe, not built"),
    _i(1, "Low Rank Factorization for Compact Multi-Head Self-Attention",
       ["heads.LowRankAttention", "variant:low_rank"],
       ["test_heads.py::test_low_rank_pooling_is_the_factorised_bilinear_attention"]),
    _i(1, "Insights into DeepSeek-V3 (MLA, FP8, MoE)",
       ["heads.MultiHeadLatentAttention", "heads.LatentCache", "variant:mla"],
       ["test_heads.py::test_mla_absorbed_equals_naive", "test_heads.py::test_mla_cached_decoding_equals_full_recompute"],
       "MLA only; FP8 training, MoE and the network topology are not attention"),
    _i(1, "Sparse Query Attention (SQA)", ["heads.SparseQueryAttention", "variant:sqa"],
       ["test_heads.py::test_sqa_with_as_many_query_heads_as_heads_is_mha",
        "test_heads.py::test_sqa_flops_fall_with_the_query_heads"]),
    _i(1, "Union of Experts (UoE) / Selective Multi-Head Attention",
       ["heads.SelectiveMultiHeadAttention", "variant:smha"],
       ["test_selective_heads.py::test_smha_is_the_authors_v3_when_every_head_has_as_many_tokens_on_every_backend",
        "test_selective_heads.py::test_smha_is_attention_among_each_heads_tokens_on_every_backend",
        "test_selective_heads.py::test_each_token_reads_only_the_heads_it_chose_and_the_router_gets_no_gradient",
        "test_selective_heads.py::test_smha_trains_in_a_language_model"],
       "SMHA after the latest released version, SMHA_v3 (YujiaoYang-work/UoE, language_modeling/model/attention/"
       "SMHA_v3.py, commit 9de0cf25): every token routed to the top half of the heads by a softmax router, each "
       "head attends only among its tokens (causal in their order, RoPE at their ranks), per-head output "
       "projection and bias added back at those tokens; the router only selects (no gradient), as released. "
       "Chosen: a head's padded slots are masked, where the code fills them with unchosen tokens picked by "
       "torch.topk among ties (equal when every head has the longest count, tested); not MoH's weighted routing. "
       "The UoME MLP experts, the tensor-parallel layout and the Transformer-XL memory are not built"),
    _i(1, "Compressed Convolutional Attention (CCA / CCGQA)",
       ["heads.CompressedAttention", "variant:cca", "variant:ccgqa"],
       ["test_heads.py::test_cca_without_compression_is_mha",
        "test_heads.py::test_cca_shrinks_parameters_flops_and_cache_by_the_compression"],
       "no fused kernel: attention in the latent space runs on the shared backends"),
    _i(1, "TPLA: Tensor-Parallel Latent Attention",
       ["heads.TensorParallelLatentAttention", "heads.tpla.hadamard", "heads.tpla.pca_basis", "variant:tpla"],
       ["test_tpla.py::test_tpla_is_its_formula_on_every_backend",
        "test_tpla.py::test_one_shard_is_mla_and_the_transform_leaves_mla_unchanged",
        "test_tpla.py::test_prefill_is_mla_and_decoding_is_tpla_from_the_sharded_cache",
        "test_tpla.py::test_two_gloo_ranks_equal_the_single_process_form",
        "test_tpla.py::test_tpla_trains_in_a_language_model"],
       "the latent and each head's input dim cut into shards (a softmax per shard, outputs summed by an "
       "all-reduce on a process group, or in one process), Hadamard / PCA / any orthogonal transform before the "
       "slicing, MLA's weights reused, MLA-form prefill then TPLA decoding from a per-rank cache; the text at hand "
       "(abstract, introduction) does not fix the rotary part or the logit scale per shard: chosen here, the "
       "rotary part whole on every shard (rope='split' cuts it too) and MLA's scale on every shard"),
    _i(1, "DHVT: Dynamic Hybrid ViT (head token)",
       ["nn.head_token.HeadTokenAttention", "variant:dhvt_head_tokens"],
       ["test_head_token.py::test_head_tokens_are_the_authors_hi_mhsa_on_every_backend",
        "test_head_token.py::test_head_tokens_merge_into_the_chosen_class_token",
        "test_head_token.py::test_head_token_vit_trains"],
       "HI-MHSA after the authors' code: a head token per channel group joins the attention and merges into "
       "the class token; the convolutional patch embedding (SOPE) and the DAFF MLP are not attention and "
       "are not built"),
    _i(1, "Wide Attention Is The Way Forward For Transformers?",
       ["models.wide.wide_lm", "models.TransformerLM", "arena.models.wide_attention"],
       ["test_wide.py::test_every_depth_has_the_same_heads_and_attention_parameters",
        "test_wide.py::test_wide_and_deep_models_train",
        "test_arena.py::test_arena_trains_the_models_beside_the_variants"],
       "the builder (a fixed total of heads over 1..n layers), in the arena as `wide_attention` (every "
       "head in one layer) against the deep `mha`; the paper's comparison across attention types and tasks "
       "is a study, not built"),
    _i(1, "Reducing the Transformer Architecture to a Minimum",
       ["nn.minimal.MinimalAttention", "variant:minimal_attention"],
       ["test_minimal.py::test_minimal_forms_are_their_formulas_forward_and_gradients",
        "test_minimal.py::test_symmetric_similarity_and_fewer_parameters",
        "test_minimal.py::test_minimal_attention_trains_in_a_language_model"],
       "collapsed W_Q W_K, symmetric q = k, no W_V / W_O; dropping the MLP is a model choice"),
    _o(1, "Hiformer: heterogeneous self-attention for recommenders", "application",
       "a recommender layer whose attention form the abstract does not give"),
    # 2. Sparsity / locality pattern
    _i(2, "MoA: Mixture of Sparse Attention",
       ["moa.search", "moa.profile", "moa.choose", "moa.influence", "moa.Span", "moa.MoAConfig", "patterns.PerHead"],
       ["test_moa.py::test_influence_is_the_derivative_of_masking_and_renormalising",
        "test_moa.py::test_window_costs_sum_the_entries_each_span_drops",
        "test_moa.py::test_search_gives_the_local_head_a_short_window_and_the_far_head_a_long_one"],
       "elastic causal windows per head and layer from a first-order loss profile on calibration batches "
       "(any lengths), chosen under a mean-span budget by a Lagrangian sweep (the paper solves a MILP and "
       "keeps initial tokens); a search tool, so no catalog variant"),
    _i(2, "Sparsifiner: learned instance-dependent sparse attention",
       ["nn.sparsifiner.Sparsifiner", "nn.sparsifiner.TokenConnectivityPredictor",
        "nn.sparsifiner.ConnectivityPredictor", "nn.sparsifiner.connectivity_loss", "variant:sparsifiner"],
       ["test_sparsifiner.py::test_predictor_is_the_low_rank_approximate_map_forward_and_gradients",
        "test_sparsifiner.py::test_token_low_rank_predictor_is_q_times_projected_keys_times_the_up_basis",
        "test_sparsifiner.py::test_attention_on_the_binarised_top_k_mask_forward_and_gradients",
        "test_sparsifiner.py::test_predictor_learns_by_distillation_and_keeps_more_attention_mass"],
       "connectivity predictor low-rank along the tokens (the paper's form, fixed length) or along the "
       "channels (any length; the catalog's), binarised top-k mask, KL distillation from the dense map; the "
       "sparse up-projection basis, the paper's loss weights and token sparsity are not built"),
    _m(2, "TiC: MSA-Conv (self-attention inside convolution windows)",
       "the windows are Neighborhood(kernel, dilation); the cyclic shifts and inter-pooling are not built; "
       "searched (issue 17): the pages corpus holds the abstract and introduction of arXiv 2310.04134 (html v2), "
       "which name the Multi-Directional Cyclic Shifted and Inter-Pooling mechanisms without their form, and "
       "the code announced at zs670980918/MSA-Conv is not in the code index",
       ["patterns.Neighborhood"]),
    _i(2, "TransNeXt: Aggregated Attention",
       ["vision.AggregatedAttention", "vision.aggregated.PooledAndLocalBias", "patterns.Sinks", "patterns.Halo",
        "variant:transnext"],
       ["test_aggregated.py::test_aggregated_attention_is_the_authors_formula_on_every_backend",
        "test_aggregated.py::test_pooled_offsets_are_the_authors_log_spaced_table",
        "test_aggregated.py::test_transnext_vit_trains"],
       "the authors' AggregatedAttention: one softmax over a zero-padded sliding neighborhood and pooled keys, "
       "cosine logits with query embedding and length-scaled temperature, window and continuous position "
       "biases, learnable tokens; the Convolutional GLU channel mixer and the TransNeXt backbone are not built"),
    _o(2, "SMITH: hierarchical encoder for long documents", "architecture",
       "a sentence-block encoder then a document encoder, each standard attention"),
    _i(2, "LRGT: Long-Range Grouping Attention",
       ["nn.two_pass.LongRangeGroupingAttention", "patterns.Dilated", "variant:lrgt"],
       ["test_two_pass.py::test_long_range_grouping_is_intra_view_then_groups_across_views",
        "test_two_pass.py::test_two_pass_modules_learn_to_spread_information"],
       "intra-view then grouped inter-view attention; the groups sample every view at a fixed stride "
       "(the abstract does not say how they sample); no reconstruction model"),
    _i(2, "HaloNets: Scaling Local Self-Attention",
       ["patterns.Halo", "vision.HaloAttention", "variant:halo", "variant:halonet_block"],
       ["test_vision.py::test_halo_attention_is_halonet", "test_patterns_structured.py::test_block_local_and_halo_grid"]),
    _i(2, "Routing Transformer", ["patterns.Routing", "variant:routing"],
       ["test_patterns_dynamic.py::test_routing_equals_dense_transcription_forward_and_gradients",
        "test_patterns_dynamic.py::test_routing_assigns_each_token_to_the_centroid_nearest_its_query_and_key"]),
    _i(2, "Block Transformer: global-to-local LM",
       ["models.block_lm.BlockTransformerLM", "patterns.BlockLocal", "variant:block_local",
        "arena.models.block_transformer"],
       ["test_block_lm.py::test_every_prediction_sees_only_earlier_tokens",
        "test_block_lm.py::test_token_decoder_attends_within_blocks_and_block_decoder_between_blocks",
        "test_block_lm.py::test_block_transformer_learns_a_task_that_needs_both_levels",
        "test_arena.py::test_block_transformer_reads_its_own_position_and_nothing_later",
        "test_arena.py::test_arena_trains_the_models_beside_the_variants"],
       "embedder, causal block decoder over block embeddings, token decoder local to each block; "
       "`multihead arena --variants block_transformer` trains it on the sequence tasks; no cached decoding"),
    _i(2, "DaViT: Dual Attention ViT",
       ["vision.ChannelGroupAttention", "vision.WindowAttention", "variant:davit_block"],
       ["test_vision.py::test_channel_group_attention_is_davit"]),
    _i(2, "Combiner: full attention with sparse cost", ["nn.combiner.CombinerAttention", "variant:combiner"],
       ["test_combiner.py::test_combiner_is_the_factorised_expectation_forward_and_gradients",
        "test_combiner.py::test_combiner_is_causal",
        "test_combiner.py::test_combiner_learns_to_copy_from_far_back"],
       "Combiner-Fixed (causal): own block directly, earlier blocks through summary tokens in one softmax; "
       "the summary key (mean) and the in-region distribution (softmax of w.k) are this library's choice; "
       "the axial and logsparse partitions are not built"),
    _i(2, "Histoformer: histogram self-attention",
       ["nn.sorted_groups.HistogramAttention", "nn.sorted_groups.sorted_group_attention", "variant:histoformer"],
       ["test_sorted_groups.py::test_sorted_group_attention_is_attention_inside_sorted_groups",
        "test_sorted_groups.py::test_histogram_heads_attend_within_and_across_intensity_bins",
        "test_sorted_groups.py::test_sorted_group_modules_learn_their_group_means"],
       "the abstract's idea: sort by intensity, bins, heads within and across bins; the paper's reshaping "
       "details, dynamic-range convolution and Pearson loss are not built"),
    _i(2, "Axial Attention (Axial Transformers)", ["patterns.Axial", "variant:axial"],
       ["test_patterns_structured.py::test_axial"]),
    _i(2, "Group Pose: grouped decoder self-attention",
       ["nn.group_pose.GroupPoseAttention", "patterns.BlockLocal", "patterns.Dilated", "variant:group_pose"],
       ["test_group_pose.py::test_two_masked_attentions_in_sequence_forward_and_gradients",
        "test_group_pose.py::test_group_pose_trains_to_pass_instance_and_type_information"],
       "the two grouped self-attentions of the decoder; the pose decoder itself is not built"),
    _i(2, "GLMix: conv on grid, MHSA on semantic slots", ["vision.slots.SlotAttention2d", "variant:glmix_block"],
       ["test_slots.py::test_slot_attention_clusters_attends_over_slots_and_dispatches",
        "test_slots.py::test_glmix_block_learns_oriented_gratings"],
       "depthwise conv on the grid, attention over soft-clustered slots, dispatch back; the clustering and "
       "dispatch modules are this library's reading of the abstract, not the paper's exact ones"),
    _i(2, "Dynamic Mask Attention (DMA)",
       ["nn.dynamic_mask.DynamicMaskAttention", "nn.dynamic_mask.dynamic_mask_attention", "scores.blocks.KeyBias",
        "patterns.KeySelection", "variant:dynamic_mask"],
       ["test_dynamic_mask.py::test_dynamic_mask_attention_is_the_papers_formula_forward_and_gradients",
        "test_dynamic_mask.py::test_module_key_weights_are_exp_a_softplus_of_the_values",
        "test_dynamic_mask.py::test_the_mask_learns_to_keep_the_tokens_that_matter"],
       "value-derived key weights exp(A softplus(v W)), top-window keys per query, weights added to the logits "
       "(Doge's form); the kept keys are gathered by the block-sparse backend, no fused CUDA kernel"),
    _i(2, "Swin Transformer (shifted windows)",
       ["patterns.ShiftedWindow", "vision.WindowAttention", "vision.swin_pair", "variant:swin", "variant:swin_block"],
       ["test_vision.py::test_window_attention_is_swin", "test_patterns_structured.py::test_shifted_window_matches_swin"]),
    _i(2, "FIT: Far-reaching Interleaved Transformers", ["nn.fit.FITBlock", "variant:fit"],
       ["test_fit.py::test_fit_block_is_local_write_global_read",
        "test_fit.py::test_groups_meet_only_through_the_latents",
        "test_fit.py::test_fit_learns_a_global_mean"],
       "one local / write / global / read round with learned latents per group; the paper's stacks of "
       "several local and global layers, adaptive computation and decoders are not built"),
    _i(2, "DLGSANet: dynamic local + sparse global self-attention",
       ["patterns.TopK", "vision.SparseGlobalAttention", "vision.dlgsa_pair", "variant:topk", "variant:dlgsa_block"],
       ["test_vision.py::test_dlgsa_pair_is_local_then_sparse_global",
        "test_patterns_dynamic.py::test_topk_equals_dense_transcription_forward_and_gradients"]),
    _i(2, "CSWin Transformer (cross-shaped windows, LePE)",
       ["patterns.CrossShapedWindow", "vision.CrossShapedWindowAttention", "variant:cswin", "variant:cswin_block"],
       ["test_vision.py::test_cross_shaped_window_attention_is_cswin_with_lepe"]),
    _i(2, "FlatFormer: flattened window attention (point clouds)",
       ["nn.sorted_groups.FlattenedWindowAttention", "nn.sorted_groups.window_order", "variant:flatformer"],
       ["test_sorted_groups.py::test_window_order_is_flatformers_lexicographic_window_sort",
        "test_sorted_groups.py::test_flattened_window_groups_are_equal_sized_runs_of_the_window_order",
        "test_sorted_groups.py::test_sorted_group_modules_learn_their_group_means"],
       "window sort, equal-size groups, axis and shift per layer (2-D coordinates); no point-cloud backbone"),
    _i(2, "Gateformer: variate-wise attention with gating", ["nn.variate.VariateAttention"],
       ["test_variate.py::test_variate_attention_is_gated_attention_across_variate_tokens",
        "test_variate.py::test_forecaster_learns_a_value_shared_across_variates"],
       "variate tokens (each series embedded alone), attention across them, gates on both stages; the "
       "gates' exact form is this library's reading of the abstract; no forecasting model"),
    _m(2, "AxFormer: pruning + selective sparse hard attention",
       "sparse hard attention in chosen layers (pruning exists as analysis.prune); searched (issue 17): the "
       "pages corpus holds only the abstract of arXiv 2010.03688 ('eliminating irrelevant word aggregations' "
       "in selected layers, no rule for which keys are kept), and no code is indexed",
       ["analysis.prune"]),
    _i(2, "SReT: Sliced Recursive Transformer", ["models.recursive.SlicedRecursiveBlock", "variant:sret"],
       ["test_recursive.py::test_recursive_passes_share_the_block_and_slice_attention",
        "test_recursive.py::test_recursion_adds_only_the_small_projections",
        "test_recursive.py::test_recursive_block_trains"],
       "recursion of one block with non-shared linear projections between passes, attention sliced into "
       "contiguous groups per pass; the paper's group permutations and full models are not built"),
    _i(2, "Recycled Attention (inference-time)",
       ["nn.recycled.RecycledAttention", "nn.recycled.recycled_attention", "patterns.KeySelection",
        "variant:recycled"],
       ["test_recycled.py::test_recycled_attention_is_the_papers_decoding_loop_forward_and_gradients",
        "test_recycled.py::test_enough_recycled_keys_is_full_causal_attention_and_fewer_is_not",
        "test_recycled.py::test_module_is_causal_and_trains"],
       "fixed-stride schedule over a whole sequence (prompt prefilled, then decoding steps); the "
       "query-similarity schedule and continued pretraining are not built"),
    _i(2, "Landmark Attention",
       ["nn.landmark.LandmarkAttention", "nn.landmark.landmark_attention", "nn.landmark.insert_landmarks",
        "patterns.blocks.BlockSelection", "patterns.blocks.NoLandmarkKeys", "scores.blocks.BlockBias",
        "variant:landmark", "variant:landmark_topk"],
       ["test_landmark.py::test_landmark_attention_is_the_papers_grouped_softmax_forward_and_gradients",
        "test_landmark.py::test_retrieval_runs_block_sparse_on_the_chosen_blocks",
        "test_landmark.py::test_landmark_model_learns_recall_through_its_landmarks"],
       "training form (grouped softmax as a bias on one softmax) and top-k block retrieval; the paper's "
       "cache offloading to a memory hierarchy is not built"),
    _i(2, "SeerAttention: learned block-sparse attention",
       ["heads.seer.SeerAttention", "heads.seer.SeerGate", "heads.seer.seer_target", "heads.seer.seer_loss",
        "heads.seer.select_blocks", "patterns.blocks.BlockSelection", "variant:seer"],
       ["test_seer.py::test_gate_is_the_papers_pooled_block_attention_forward_and_gradients",
        "test_seer.py::test_target_is_the_block_max_pool_of_the_full_map_renormalised",
        "test_seer.py::test_attention_on_the_chosen_blocks_is_masked_softmax_forward_and_gradients",
        "test_seer.py::test_gate_learns_by_distillation_and_keeps_more_attention_mass"],
       "gate, distillation target and loss, top-k block inference on the block-sparse backend; the target "
       "comes from the dense reference map (no fused kernel), and the gate is block-causal, not token-causal"),
    # 3. Multi-scale / cross attention
    _i(3, "Conditional Cross-Attention Network", ["nn.MultiHeadAttention"],
       ["test_module.py::test_explicit_head_dim_and_cross_attention_lengths"],
       "the mechanism is plain cross-attention from image tokens to the condition embedding "
       "(`kv_dim=`); the fashion model is not built"),
    _i(3, "MEDUSA: single body, multi-scale heads",
       ["vision.MultiScaleHeadAttention", "variant:medusa_heads"],
       ["test_vision.py::test_multiscale_heads_see_pooled_key_value_pyramids"],
       "heads on pooled key/value pyramids; the encoder-decoder wiring is a model design"),
    _m(3, "MemMC-MAE: memory-augmented SA + multi-level cross-attention",
       "the memory of normal patterns and its update rule (learned key/value slots exist as SinkAttention); "
       "searched (issue 17): the pages corpus holds the abstract of arXiv 2203.11725 (memory-augmented "
       "self-attention in the encoder, multi-level cross-attention in the decoder, no formulas) and no code "
       "is indexed",
       ["nn.SinkAttention"]),
    _i(3, "Multi-scale self-guided attention",
       ["vision.dual_attention.PositionAttention", "vision.dual_attention.ChannelAttention",
        "bench.readouts.OnSquareGrid"],
       ["test_dual_attention.py::test_dual_attention_modules_are_the_authors_on_every_backend",
        "test_dual_attention.py::test_dual_attention_starts_as_the_identity_and_trains",
        "test_bench.py::test_bench_measures_the_readout_and_cross_modules_forward_and_backward"],
       "the position and channel attention modules (DANet's, after the authors' PAM_Module and CAM_Module: "
       "unscaled one-head attention over positions with dim/8 queries and keys; channels as tokens with "
       "softmax(max - energy) = the queries -X over the keys X), each entering the residual through gamma; the "
       "multi-scale network, its semantic encoder-decoder and the guiding losses are not built; `multihead bench "
       "--only danet_position,danet_channel` measures them"),
    _i(3, "DCAL: Dual Cross-Attention Learning",
       ["nn.dcal.GlobalLocalCrossAttention", "nn.dcal.PairWiseCrossAttention", "nn.dcal.attention_rollout",
        "bench.readouts.TopTokensQueryAll", "bench.readouts.WithDistractor"],
       ["test_dcal.py::test_rollout_multiplies_the_half_identity_mixed_maps_from_the_first_layer",
        "test_dcal.py::test_glca_lets_the_top_tokens_query_every_token",
        "test_dcal.py::test_pwca_spreads_the_softmax_over_both_images",
        "test_dcal.py::test_glca_probe_learns_from_the_high_scoring_tokens",
        "test_bench.py::test_bench_measures_the_readout_and_cross_modules_forward_and_backward"],
       "GLCA (top-R rollout tokens query all), PWCA (keys of an image pair) and the rollout; they take extra "
       "inputs (scores, a distractor), so no catalog variant; the re-ID training schedule is not built; "
       "`multihead bench --only dcal_glca,dcal_pwca` measures them"),
    _i(3, "Pointer Networks", ["nn.pointer.PointerAttention", "bench.readouts.Pointing"],
       ["test_pointer.py::test_additive_pointer_is_the_papers_softmax_over_inputs_forward_and_gradients",
        "test_pointer.py::test_pointer_network_learns_to_sort",
        "test_bench.py::test_bench_measures_the_readout_and_cross_modules_forward_and_backward"],
       "the pointing head (additive as in the paper, or dot); the LSTM encoder-decoder is left to the user "
       "(the tests build one that sorts); an output head, so no catalog variant; `multihead bench --only "
       "pointer` measures it"),
    _i(3, "Efficient Probing (attentive probe)", ["nn.probe.AttentiveProbe", "bench.readouts.READOUTS"],
       ["test_probe.py::test_efficient_probe_is_multi_query_pooling_forward_and_gradients",
        "test_probe.py::test_one_efficient_query_is_exactly_a_one_head_standard_probe",
        "test_probe.py::test_probe_learns_to_read_the_flagged_token",
        "test_bench.py::test_bench_measures_the_readout_and_cross_modules_forward_and_backward"],
       "Efficient Probing and the standard attentive probe; a classifier head, not a token mixer, so it has no "
       "catalog variant; `multihead bench --only attentive_probe` measures it"),
    _i(3, "DuoFormer: scale-wise + patch-wise attention",
       ["vision.LocalGlobalAttention", "variant:duoformer"],
       ["test_vision.py::test_local_global_attention_is_a_window_path_and_a_pooled_path",
        "test_vision.py::test_local_global_presets_and_bad_arguments"],
       "patch-wise (window) and scale-wise (pooled) heads on one map; the CNN feature tokenizer is not built"),
    _i(3, "CrossViT: cross-attention multi-scale ViT",
       ["vision.CrossAttentionFusion", "vision.CrossViTAttention", "variant:crossvit"],
       ["test_vision.py::test_cross_attention_fusion_is_crossvit",
        "test_vision.py::test_crossvit_attention_keeps_branches_apart_and_fuses_their_cls_tokens"]),
    _i(3, "PEM: prototype-based cross-attention",
       ["nn.prototype_cross.PrototypeCrossAttention", "nn.prototype_cross.KeyArgmax",
        "nn.prototype_cross.LocalRepresentation", "bench.readouts.Prototypes"],
       ["test_prototype_cross.py::test_prototype_cross_attention_is_the_authors_pem_ca",
        "test_prototype_cross.py::test_key_argmax_is_one_hot_on_the_best_allowed_key",
        "test_prototype_cross.py::test_pem_queries_learn_to_read_gratings",
        "test_bench.py::test_bench_measures_the_readout_and_cross_modules_forward_and_backward"],
       "PEM_CA after the authors' code: per head each query's most similar pixel (the KeyArgmax normaliser, "
       "reference backend) under the previous mask, then the prototype update; an empty mask sees every "
       "pixel (Mask2Former's rule, not the authors' pixel 0); the efficient FPN pixel decoder and the "
       "segmentation model are not built; `multihead bench --only pem` measures it"),
    _i(3, "CrossFormer: cross-scale embedding + LSDA + DPB",
       ["scores.DynamicPositionBias", "vision.NeighborhoodAttention2d", "variant:crossformer_block"],
       ["test_scores_relative2d.py::test_dynamic_position_bias_is_an_mlp_of_each_offset",
        "test_vision.py::test_crossformer_long_distance_attention_groups_positions_an_interval_apart"],
       "LSDA and DPB; the cross-scale embedding layer is a convolutional stem"),
    _i(3, "MAFormer: Multi-scale Attention Fusion", ["vision.LocalGlobalAttention", "variant:maformer"],
       ["test_vision.py::test_local_global_attention_is_a_window_path_and_a_pooled_path",
        "test_vision.py::test_local_global_presets_and_bad_arguments"]),
    _i(3, "TNT: Transformer in Transformer",
       ["vision.tnt.TNTBlock", "patterns.BlockLocal", "bench.readouts.WordsAndSentences"],
       ["test_tnt.py::test_tnt_block_is_inner_attention_per_patch_then_outer_attention",
        "test_tnt.py::test_tiny_tnt_learns_oriented_gratings",
        "test_bench.py::test_bench_measures_the_readout_and_cross_modules_forward_and_backward"],
       "the two-stream block (inner attention over words per patch, folded into the sentences, outer "
       "attention); it takes two streams, so no catalog variant; `multihead bench --only tnt` measures "
       "it"),
    _i(3, "FcaFormer: Forward Cross Attention",
       ["nn.forward_cross.ForwardCrossAttention", "nn.forward_cross.FcaStage", "nn.forward_cross.TokenMerge",
        "variant:fcaformer"],
       ["test_forward_cross.py::test_forward_cross_attention_attends_to_own_and_scaled_earlier_tokens",
        "test_forward_cross.py::test_stage_blocks_read_the_merged_outputs_of_earlier_blocks",
        "test_forward_cross.py::test_fca_stage_trains"],
       "earlier blocks' tokens as extra keys with per-channel learnable scales; the token merge is 1-D "
       "(average + depthwise conv), not the paper's 2-D strided convolutions"),
    _i(3, "kMaX-DeepLab: k-means cross-attention",
       ["nn.kmeans_cross.KMeansCrossAttention", "nn.kmeans_cross.ClusterArgmax",
        "bench.readouts.ClusterCentres"],
       ["test_kmeans_cross.py::test_kmeans_cross_attention_is_the_hard_assignment_update_forward_and_gradients",
        "test_kmeans_cross.py::test_cluster_argmax_is_one_hot_over_the_queries",
        "test_kmeans_cross.py::test_centres_learn_their_clusters_sums",
        "test_bench.py::test_bench_measures_the_readout_and_cross_modules_forward_and_backward"],
       "the cluster-wise argmax as a normaliser (reference backend), centres updated with their pixels' "
       "values; the mask losses (deep supervision) and the segmentation model are not built; it updates "
       "cluster centres from pixels, so no catalog variant; `multihead bench --only kmax` measures "
       "it"),
    _o(3, "GNMT: Google's Neural Machine Translation", "architecture",
       "an LSTM translation system; its attention is plain encoder-decoder attention"),
    # 4. Score / position modifiers
    _i(4, "RCMHA: Relative Convolutional MHA", ["nn.RCMHA", "variant:rcmha"],
       ["test_relative_attention.py::test_rcmha_matches_its_formula_on_every_backend",
        "test_relative_attention.py::test_rcmha_trains"]),
    _i(4, "GAAM: Multi-Head Gaussian Adaptive Attention", ["normalizers.GaussianAdaptive", "variant:gaam"],
       ["test_gaam.py::test_gaam_is_the_papers_gaussian_reweighting_forward_and_gradients",
        "test_gaam.py::test_gaam_module_trains_its_gaussians"],
       "reference backend only; the Importance Factor metric is not built"),
    _m(4, "CoordFormer: Coordinate-Aware Attention",
       "pixel-level coordinates kept in attention and Body Center Attention; searched (issue 17): the pages "
       "corpus holds only the abstract (arXiv 2308.10334, ICCV 2023); the authors' repository (Li-Hao-yuan/"
       "CoordFormer, one commit 2e7f61c7) holds dated snapshots of transformer.py, the latest romp_store/5.15/"
       "transformer.py and visualization/NAT/romp_nat/lib/models/transformer.py: both define an NTAttention that "
       "multiplies q and k elementwise (no sum over channels), softmaxes over the channels, convolves k and v "
       "over (tokens, channels), and (NAT) adds a fixed 2-D sinusoidal table to the weights - no coordinate term "
       "and no Body Center Attention (find_string BodyCenterAttention: nothing), so the published form is not "
       "in the released code and no form to test against"),
    _m(4, "CRENER: direction- and distance-aware masked self-attention",
       "unscaled attention with direction- and distance-aware masks (pieces: scale=1, Causal, ALiBi); the "
       "abstract names the masks but gives neither their form nor how they combine; searched (issue 17): the "
       "pages corpus ('CRENER direction-aware distance-aware masked self-attention nested NER') returns other "
       "NER papers and TENER (the direction/distance-aware unscaled attention it builds on), no CRENER text or "
       "code; find_repos/find_string hold no CRENER repository"),
    _i(4, "ConViT: Gated Positional Self-Attention (GPSA)",
       ["nn.GatedPositionalAttention", "variant:gpsa"],
       ["test_gpsa.py::test_gpsa_matches_the_formula_on_every_backend",
        "test_gpsa.py::test_positional_init_mimics_a_convolution"]),
    _i(4, "iLLaMA: causal attention for ViT",
       ["nn.soft_causal.SoftCausalAttention", "scores.SoftCausal", "nn.soft_causal.soft_mask_rate",
        "nn.soft_causal.set_soft_mask_rate", "models.VisionTransformer", "variant:illama"],
       ["test_soft_causal.py::test_soft_causal_attention_is_the_blended_mask_on_every_backend",
        "test_soft_causal.py::test_post_class_token_reads_every_image_token_under_causal_attention",
        "test_soft_causal.py::test_illama_vit_trains_through_the_soft_mask_schedule"],
       "causal attention with the soft mask M = rate + (1 - rate) tril on exp(logits) (rate decayed linearly "
       "to 0, the authors' schedule) and the post-sequence class token (`VisionTransformer(class_token="
       "'post')`); the authors' code applies M after the softmax without renormalising, which is not "
       "reproduced; RMSNorm, SwiGLU and RoPE (the LLaMA parts) are left to the model"),
    _i(4, "Music Transformer: memory-efficient relative attention",
       ["nn.RelativeAttention", "scores.RelativeEmbedding", "scores.skew", "variant:music_relative"],
       ["test_relative_attention.py::test_relative_embedding_matches_the_naive_form_forward_and_gradients",
        "test_relative_attention.py::test_relative_memory_is_linear_in_the_sequence"]),
    _o(4, "SeqPE: Sequential Position Encoding", "architecture",
       "an input position embedding (a small encoder of the position's digits) and its training losses; "
       "attention is unchanged"),
    _m(4, "Meta-tokens + meta-attention",
       "the dedicated meta-attention beside causal MHA (the prepended learned tokens exist as Registers); "
       "searched (issue 17): the pages corpus holds the abstract and introduction of arXiv 2509.16278 only, "
       "and no code (the ICLR 2026 notes say 'code: TBD'); third-party summaries say the meta-attention flows "
       "only between meta-tokens, but neither the paper's mask, what non-meta positions receive, nor where the "
       "layer sits in the block is in the text at hand",
       ["nn.Registers"]),
    _o(4, "ResFormer: multi-resolution training + global-local PE", "recipe",
       "multi-resolution training with a scale-consistency loss; the embedding is added at the input"),
    _o(4, "Reviving Shift Equivariance in ViTs", "architecture",
       "polyphase anchoring in patch embedding and subsampling; the attention inside is unchanged"),
    _i(4, "Sigmoid Self-Attention + FlashSigmoid", ["normalizers.Sigmoid", "variant:sigmoid"],
       ["test_normalizers.py::test_sigmoid_reference_is_the_papers_formula_forward_and_gradients",
        "test_normalizers.py::test_sigmoid_blocksparse_matches_reference"],
       "FlashSigmoid's role is played by the block-sparse backend (forward and backward)"),
    # 5. Linear / recurrent / memory / SSM hybrids
    _o(5, "MHS-VM: Multi-Head Scan for Vision Mamba", "not-attention",
       "selective SSM scans in parallel subspaces"),
    _i(5, "MambAttention: Mamba + shared time/frequency MHA",
       ["nn.two_pass.SharedAxisAttention", "patterns.Axial", "variant:shared_axes"],
       ["test_two_pass.py::test_shared_axis_attention_is_time_then_frequency_with_one_set_of_weights",
        "test_two_pass.py::test_two_pass_modules_learn_to_spread_information"],
       "the time- then frequency-axis attention with shared weights; the Mamba layers are not attention "
       "and are not built"),
    _o(5, "Empirical Study of Mamba-based LMs (Mamba-2-Hybrid)", "architecture",
       "a layer mix of Mamba-2, attention and MLP; the attention layers are standard"),
    _i(5, "SLAB: Simplified Linear Attention + PRepBN",
       ["linear.LinearAttention", "variant:slab_linear"],
       ["test_linear.py::test_non_causal_linear_attention_chunked_recurrent_and_dense"],
       "simplified linear attention; PRepBN is a normalisation recipe"),
    _i(5, "Attention as an RNN (Aaren)", ["linear.Aaren", "linear.chunked_prefix_attention", "variant:aaren"],
       ["test_linear.py::test_prefix_scan_equals_softmax_attention_over_each_prefix",
        "test_linear.py::test_chunked_prefix_attention_equals_the_rnn"]),
    _i(5, "Titans: neural long-term memory",
       ["nn.titans.NeuralMemory", "nn.titans.TitansGatedAttention", "nn.titans.decay_products",
        "variant:titans_mag"],
       ["test_titans.py::test_memory_is_the_papers_recurrence",
        "test_titans.py::test_memory_learns_an_association_at_test_time",
        "test_titans.py::test_mag_layer_is_window_attention_gated_by_memory_on_every_backend",
        "test_titans.py::test_titans_is_causal_and_trains"],
       "the neural memory (matrix or 2-layer MLP per head; surprise with momentum, forgetting, the chunked "
       "mini-batch form, learned initial memory) and MAG (persistent tokens, causal window attention, "
       "memory, gated); gates as sigmoids of linear maps, step size and momentum bounded for stability (our "
       "choice: unbounded, training diverged); the depthwise convolutions and the MAC / MAL variants are not "
       "built"),
    _i(5, "TransNormerLLM + Lightning Attention",
       ["linear.LightningAttention", "linear.chunked_linear_attention", "variant:lightning"],
       ["test_linear.py::test_causal_decayed_linear_attention_equals_the_dense_parallel_form",
        "test_linear.py::test_chunked_linear_attention_equals_recurrent"]),
    _i(5, "RMT: Retentive Networks meet ViT",
       ["linear.ManhattanSelfAttention", "linear.manhattan_attention", "variant:rmt_manhattan"],
       ["test_linear.py::test_manhattan_decay_is_gamma_to_the_city_block_distance",
        "test_linear.py::test_decomposed_manhattan_attention_is_rows_then_columns_with_axis_decays"]),
    # 6. Kernels and systems
    _i(6, "Unpadded BERT (grouped multi-stream FMHA)",
       ["varlen.pack", "varlen.varlen_attention", "patterns.Documents"],
       ["test_varlen.py::test_module_packed_equals_padded", "test_varlen.py::test_varlen_attention_takes_flash_attention_layout"],
       "unpadded attention on packed batches; the multi-stream CUDA kernel and cross-worker balancing are not built"),
    _i(6, "Faster Neighborhood Attention (GEMM-based and fused NA)",
       ["patterns.Neighborhood", "backends.blocksparse", "variant:neighborhood", "variant:nat_block"],
       ["test_patterns_structured.py::test_neighborhood_matches_natten_definition",
        "test_blocksparse_tiles.py::test_tiled_plan_matches_reference"],
       "neighborhoods run tile by tile on the block-sparse backend (CPU; untested on CUDA)"),
    _i(6, "Unified View of Long-Sequence Models (distributed MHA)",
       ["distributed.all_to_all_attention", "distributed.ring_attention"],
       ["test_distributed.py::test_two_ranks_equal_single_process"],
       "distributed attention on gloo ranks; the unified token-mixer template is not built"),
    _i(6, "Sequence Parallelism: Ring Self-Attention",
       ["distributed.ring_attention", "distributed.ContextParallel"],
       ["test_distributed.py::test_four_ranks_equal_single_process",
        "test_distributed.py::test_ring_skips_blocks_the_pattern_does_not_need"]),
    _i(6, "ByteTransformer: padding-free variable-length transformer",
       ["varlen.pack", "varlen.unpack", "patterns.Documents"],
       ["test_varlen.py::test_module_packed_equals_each_sequence_alone"],
       "padding-free attention; no fused GPU kernel"),
    _i(6, "LightSeq: sequence-level parallelism",
       ["distributed.ring_attention", "distributed.ContextParallel"],
       ["test_distributed.py::test_module_context_parallel_equals_single_process"],
       "sequence split for any head count (MHA, GQA); the rematerialisation-aware checkpointing is not built"),
    _i(6, "Generalized Neighborhood Attention (GNA)",
       ["patterns.Neighborhood", "variant:dilated_neighborhood", "variant:dinat_block"],
       ["test_patterns_structured.py::test_neighborhood_strided_dilated_cases",
        "test_patterns_structured.py::test_neighborhood_matches_natten_library"],
       "sliding, strided and blocked neighborhoods as one pattern; no Blackwell kernel or simulator"),
    _o(6, "FuseMax: Einsum-cascade attention accelerator", "hardware",
       "an accelerator mapping and a formalism for counting passes"),
    _i(6, "Mesa: memory-saving training (head-wise quantization)",
       ["nn.mesa.MesaAttention", "nn.mesa.mesa_attention", "nn.mesa.quantize_per_head", "nn.mesa.saved_bytes",
        "variant:mesa"],
       ["test_mesa.py::test_forward_is_exact_and_gradients_are_those_at_the_dequantised_inputs",
        "test_mesa.py::test_kept_bytes_fall_to_a_quarter_of_q_k_v_and_below_every_backend",
        "test_mesa.py::test_module_matches_multiheadattention_and_trains"],
       "the attention core only (8-bit per-head q, k, v, recomputed in backward; absmax scales, not Mesa's "
       "running estimates); the model's other activations (GELU, LayerNorm, projections) are not quantised"),
    _o(6, "Core Attention Disaggregation (CAD / DistCA)", "hardware",
       "attention servers across a GPU cluster with dynamic re-batching"),
    _o(6, "LLM.int8()", "not-attention",
       "int8 matmuls with outlier decomposition for the linear layers, not the attention"),
    # 7. Analysis, interpretability and theory
    _i(7, "VHD / VHR: Vision-aware Head Divergence",
       ["head_divergence.context_divergence", "head_divergence.reinforcement_mask", "analysis.head_mask"],
       ["test_head_divergence.py::test_divergence_of_one_layer_is_the_mean_distance_of_head_outputs",
        "test_head_divergence.py::test_a_head_that_reads_the_context_diverges_and_a_local_one_does_not",
        "test_head_divergence.py::test_reinforcement_scales_the_top_heads"],
       "per-head output shift with the context's keys hidden (the paper drops the image from the prompt) "
       "and the top-k boost through head_mask; not evaluated on a vision-language model"),
    _o(7, "In-Context Linear Regression Demystified (multi-head softmax)", "theory",
       "training dynamics of multi-head softmax attention on linear regression"),
    _i(7, "How Does Attention Work in ViTs? (visual analytics)",
       ["analysis.ablation_importance", "analysis.gradient_importance", "analysis.attention_distance",
        "analysis.head_metrics"],
       ["test_analysis.py::test_ablation_importance_is_the_loss_change_under_a_head_mask",
        "test_analysis.py::test_gradient_importance_matches_finite_differences_of_the_gate",
        "test_analysis.py::test_pixel_distance_of_a_neighborhood_layer_stays_inside_its_window"],
       "pruning-based head importance and attention distance per head; the pattern autoencoder is not built"),
    _m(7, "Fixing Imbalanced Attention (LVLM hallucination)",
       "visual-token selection and per-head amplification by measured visual sensitivity; searched (issue 17): "
       "the pages corpus ('imbalanced attention LVLM hallucination visual token head amplification') returns "
       "neighbouring methods (VisFlow arXiv 2506.12609, AIR arXiv 2603.24058) but not this paper's text, and no "
       "code; the pieces exist (head_divergence.reinforcement_mask, analysis.head_mask)",
       ["head_divergence.reinforcement_mask"]),
    _i(7, "Visual Attention Sink / VAR",
       ["redistribution.redistribute", "redistribution.find_sinks", "redistribution.image_centric_heads",
        "redistribution.redistributed_attention", "analysis.sink_score"],
       ["test_redistribution.py::test_redistribution_moves_p_of_the_sink_weight_to_the_other_image_tokens",
        "test_redistribution.py::test_sinks_by_massive_activation_and_image_centric_heads",
        "test_redistribution.py::test_the_model_hook_replaces_the_chosen_heads_with_redistributed_attention"],
       "sink tokens by massive activation, image-centric heads, the redistribution as a head hook on "
       "multihead models; not run on a multimodal model (no Hugging Face hook for it)"),
    _o(7, "Localizing and Editing Knowledge in T2I models (Diff-QuickFix)", "application",
       "causal mediation and a closed-form edit of a text-to-image model"),
    _o(7, "Scan and Snap (1-layer transformer dynamics)", "theory", "SGD dynamics of one attention layer"),
    _i(7, "Sparse autoencoders for circuit identification",
       ["analysis.sae_circuit", "analysis.DiscreteSAE", "analysis.train_sae", "analysis.capture"],
       ["test_sae_circuit.py::test_sae_loss_and_codes_match_a_transcription",
        "test_sae_circuit.py::test_training_step_is_the_authors_projected_gradient_then_renormalisation",
        "test_sae_circuit.py::test_unique_codes_are_set_differences_per_head",
        "test_sae_circuit.py::test_finds_exactly_the_planted_heads",
        "test_sae_circuit.py::test_ranks_the_planted_heads_first_when_the_pairs_also_differ_elsewhere"],
       "after the authors' code (charlieoneill11/sae-circuits src/main.py, sae.py, train.py, node.py; the "
       "paper's text beyond the abstract was not found): one SAE shared by every head (tied bias, unit-norm "
       "rows, ReLU, MSE + 0.02 mean L1, Adam 1e-3, 500 full-batch steps, 300 features, 10 training examples "
       "from both sets) on head outputs averaged over tokens; code = argmax hidden unit; score = distinct "
       "codes only positives have (optionally a share of all the head's codes); node method only. Chosen: "
       "head outputs before the output projection (the authors use each head's d_model result), and heads "
       "chosen above a threshold / top_k (the authors rank them and read the threshold off a known "
       "circuit); tested on heads planted by weights, not on GPT-2's IOI circuit"),
    _i(7, "Cross-Attention is Half Explanation (speech-to-text)",
       ["attribution.input_saliency", "attribution.cross_attention_map", "attribution.agreement",
        "analysis.capture"],
       ["test_attribution.py::test_saliency_is_gradient_times_input_of_each_output_norm",
        "test_attribution.py::test_attention_of_a_value_linear_layer_agrees_with_its_saliency"],
       "the comparison tool (cross-attention maps per head/layer or averaged, gradient x input saliency, "
       "Pearson and overlap); the paper's attribution method and speech models are not reproduced"),
    _o(7, "Deconstructing Attention (design principles)", "theory",
       "a controlled study; the relaxed variants are not specified in the abstract"),
    _o(7, "What can a Single Attention Layer Learn? (random features)", "theory",
       "sample-complexity theory of random-feature attention"),
    _o(7, "Brain-like processing via shallow untrained MHA", "theory", "an alignment study with reading times"),
    _o(7, "Transformers as Pavlovian Conditioning", "theory", "attention read as associative memory"),
    _o(7, "ViT as a Path Ensemble", "recipe",
       "layers rewritten as paths, path pruning and self-distillation; attention is unchanged"),
    _o(7, "Transformers as Support Vector Machines", "theory", "attention optimisation as a hard-margin SVM"),
    _o(7, "Computational ingredients of human-like representations", "theory",
       "an alignment study across 70 LLMs"),
    _o(7, "Self-attention as a stiffness-aware step-size (StepNet)", "theory",
       "a dynamical-system reading of attention"),
    _o(7, "Dynamical Systems Framework: attention vs SSM vs RNN", "theory",
       "a common representation of attention, SSMs and RNNs"),
    # 8. Benchmarks
    _i(8, "Long Range Arena (LRA)",
       ["arena.ListOps", "arena.lra.LRAText", "arena.lra.LRARetrieval", "arena.lra.LRAImage", "arena.lra.Pathfinder"],
       ["test_lra.py::test_text_label_is_the_majority_of_sentiment_words",
        "test_lra.py::test_retrieval_label_says_whether_the_two_documents_share_a_topic",
        "test_lra.py::test_image_is_the_quantised_shapes_row_by_row",
        "test_lra.py::test_pathfinder_dots_are_joined_exactly_when_one_curve_links_them",
        "test_lra.py::test_a_model_learns_the_text_task_and_the_arena_runs_a_row"],
       "the five tasks, generated (no download): `multihead arena --task listops,lra_text,lra_retrieval,"
       "lra_image,pathfinder`; text and retrieval over a generated lexicon instead of IMDb and the ACL "
       "Anthology, retrieval's two documents in one sequence (not a two-tower model), images of generated "
       "shapes instead of CIFAR-10, Path-X and the LRA's 1K-16K lengths left to `--length` and the sizes"),
    _i(8, "Long-Context Attention Benchmark (kernels + context parallelism)",
       ["bench.run_bench", "cli.main"],
       ["test_bench.py::test_bench_covers_every_catalog_variant",
        "test_bench.py::test_bench_runs_the_peers_side_by_side"],
       "kernels across mask patterns and lengths (`multihead bench`); context-parallel runs are tested "
       "but not benchmarked"),
    # 10. Conv-attention hybrids and alternatives
    _o(10, "SpectFormer: spectral + MHSA layers", "architecture", "spectral layers beside standard MHSA layers"),
    _o(10, "HyperZ.Z.W operator / Terminator", "not-attention", "an attention-free hyper-kernel operator"),
    _o(10, "VAN: Large Kernel Attention (LKA)", "not-attention", "a decomposed large-kernel convolution"),
    _o(10, "Attentive Convolution (ATConv)", "not-attention", "a convolution with content-dependent kernels"),
    _o(10, "ULSAM: Ultra-Lightweight Subspace Attention", "not-attention",
       "CNN feature-map gating per subspace, no query-key product"),
    _o(10, "FMViT: multiple-frequency mixing ViT", "architecture",
       "a hybrid backbone; its lightweight MHSA is not described in the abstract"),
    _o(10, "Squeezeformer (ASR)", "architecture", "a temporal U-Net around standard MHA"),
    _o(10, "LowFormer: hardware-efficient backbone", "architecture",
       "macro design by measured latency; the slimmed MHSA is not described"),
    _o(10, "Activator: GLU MLP instead of attention", "not-attention", "a GLU MLP replaces attention"),
    _o(10, "AsCAN: asymmetric convolution-attention network", "architecture",
       "the layout of conv and transformer blocks"),
    _i(10, "CvT: Convolutions in ViT", ["vision.conv_projection.ConvProjectionAttention", "variant:cvt_block"],
       ["test_cvt.py::test_conv_projection_attention_is_cvts_formula_forward_and_gradients",
        "test_cvt.py::test_cvt_block_learns_oriented_gratings"],
       "the convolutional projection (depthwise conv + BN, strided keys and values); the convolutional "
       "token embedding between stages is a model design (VisionTransformer merges patches instead)"),
    _o(10, "Tokens-to-Token ViT (T2T)", "architecture", "token merging between layers; attention unchanged"),
    _o(10, "Multi-Dimensional Hyena (Hyena N-D)", "not-attention", "an attention-free long convolution"),
    _o(10, "EfficientFormer", "architecture", "latency-driven slimming of a ViT"),
    _o(10, "MOAT: mobile convolution + attention block", "architecture",
       "an MBConv before attention; the window attention without shifts is WindowAttention(shift=0)",
       ["vision.WindowAttention"]),
    # 11. Attention control in generative models
    _o(11, "IR-Diffusion: Isolation and Reposition Attention", "application",
       "training-free masks and rescaling inside a diffusion model's attention"),
    _o(11, "MultiCrafter: spatially disentangled attention", "recipe",
       "positional supervision of attention regions and online RL"),
    _o(11, "IDM-VTON: attention-layer feature injection", "application",
       "garment features fed into a UNet's cross- and self-attention"),
    _o(11, "DreamTuner: self-subject-attention", "application",
       "queries of the generated image attend to its own and a reference image's keys (plain attention)"),
    # 12. Token reduction / selection
    _o(12, "DyVTE: Dynamic Visual-Token Exit", "application",
       "hyper-networks that drop all visual tokens of an MLLM after a layer"),
    _o(12, "GLSim: global-local similarity token selection", "not-attention",
       "patch selection by CLS-patch cosine similarity, outside attention"),
    _o(12, "Expediting large ViTs for dense prediction", "architecture",
       "token clustering and reconstruction layers between unchanged attention layers"),
    # 13. Compression, adaptation and merging
    _o(13, "ConTraCon: convolutional re-weighting of Q/K/V", "recipe",
       "continual-learning re-weighting of the projection weights per task"),
    _i(13, "Transformer Fusion with Optimal Transport",
       ["fusion.fuse", "fusion.head_transport", "fusion.sinkhorn"],
       ["test_fusion.py::test_a_head_permuted_copy_is_aligned_and_fused_back_exactly",
        "test_fusion.py::test_aligned_fusion_keeps_the_function_where_plain_averaging_does_not",
        "test_fusion.py::test_sinkhorn_plan_has_uniform_marginals"],
       "OT (Sinkhorn) alignment of the heads of two attention layers of one shape, then averaging; the "
       "other components (LayerNorm, MLP, residual stream) and fusion across widths are not built"),
    _o(13, "NViT: Hessian-aware global ViT pruning", "recipe",
       "a pruning criterion (Hessian-aware saliency ranking heads, q/k/v and MLP dimensions across all layers) "
       "and a reallocation of the remaining widths; the pruned blocks are standard attention of smaller size, "
       "so nothing in the attention changes (head pruning by importance exists: analysis.prune, "
       "analysis.gradient_importance)",
       ["analysis.prune", "analysis.gradient_importance"]),
    _i(13, "p-Laplacian adapter (p-adapter)",
       ["nn.p_adapter.PLaplacianAttention", "nn.p_adapter.p_laplacian_logits", "nn.p_adapter.adaptive_pool_matrix",
        "variant:p_adapter"],
       ["test_p_adapter.py::test_values_graph_is_the_authors_self_attention_adapter_on_every_backend",
        "test_p_adapter.py::test_bipartite_graph_is_the_authors_cross_attention_adapter_on_every_backend",
        "test_p_adapter.py::test_p_two_is_the_plain_map_with_a_self_loop",
        "test_p_adapter.py::test_only_the_adapter_trains_and_the_loss_falls"],
       "after the authors' code (wuhy68/p-Adapter, eff_blip/eff_modeling_blip.py, commit 27ea4b44): the attention "
       "map as a graph, edges re-weighted by ||sqrt(A + eps)(F_j - F_i) + eps||^(p-2) over adapter features of the "
       "projected values (and queries), renormalised with the self-loop 2 mu / p, gated and projected back; the "
       "self-attention graph (values) and the cross-attention bipartite graph (queries and pooled values, the "
       "self-loop only in the denominator, as the code slices it); learnable p and mu; the authors' eps kept, "
       "which for p < 2 leaves a self-attention node nearly all weight on itself; BLIP and the FFN adapter "
       "are not built")
)


# -- names and tests -------------------------------------------------------------------------------


def resolve(name: str):
    """The object an ``offers`` entry names: ``variant:<name>`` (a catalog variant) or a dotted path
    under ``multihead`` (``heads.MixtureOfHeads``). ``LookupError`` when it does not exist."""
    if name.startswith("variant:"):
        from . import catalog

        try:
            return catalog.get(name.removeprefix("variant:"))
        except KeyError as error:
            raise LookupError(str(error)) from None
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(["multihead", *parts[:split]]))
        except ModuleNotFoundError:
            continue
        for attr in parts[split:]:
            if not hasattr(obj, attr):
                raise LookupError(f"multihead.{name}: {obj.__name__} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise LookupError(f"multihead.{name}: no such module")


def variants_covered() -> set[str]:
    """Catalog variant names that some row offers."""
    return {n.removeprefix("variant:") for r in ROWS for n in r.offers if n.startswith("variant:")}


def problems(rows=ROWS, test_root=None) -> list[str]:
    """Everything wrong with ``rows``: names that do not resolve, tests that do not exist (when
    ``test_root``, the tests folder, is given), rows without what their status needs, duplicates."""
    out, seen = [], set()
    for r in rows:
        where = f"{r.paper!r}"
        if r.paper in seen:
            out.append(f"{where}: listed twice")
        seen.add(r.paper)
        if r.status == IMPLEMENTED and not (r.offers and r.tests):
            out.append(f"{where}: implemented rows need offers and tests")
        if r.status == OUT_OF_SCOPE and r.reason not in REASONS:
            out.append(f"{where}: out-of-scope rows need a reason from {sorted(REASONS)}, got {r.reason!r}")
        if r.status != OUT_OF_SCOPE and r.reason is not None:
            out.append(f"{where}: only out-of-scope rows take a reason")
        if r.status != IMPLEMENTED and r.tests:
            out.append(f"{where}: only implemented rows name tests")
        if r.status != IMPLEMENTED and not r.note:
            out.append(f"{where}: {r.status} rows need a note")
        for name in r.offers:
            try:
                resolve(name)
            except LookupError as error:
                out.append(f"{where}: {error}")
        if test_root is not None:
            for test in r.tests:
                file, _, func = test.partition("::")
                path = test_root / file
                if not func or not path.is_file():
                    out.append(f"{where}: test file of {test} does not exist")
                elif not re.search(rf"^def {re.escape(func)}\(", path.read_text(), re.M):
                    out.append(f"{where}: {file} has no test function {func}")
    return out


def catalog_problems(variants) -> list[str]:
    """Catalog variants that name no paper (title, year) or a malformed arXiv id."""
    out = []
    for v in variants:
        paper = getattr(v, "paper", None)
        if paper is None or not getattr(paper, "title", "") or not isinstance(getattr(paper, "year", None), int):
            out.append(f"variant {v.name!r} names no paper (title and year)")
        elif paper.arxiv is not None and not re.fullmatch(r"\d{4}\.\d{4,5}", paper.arxiv):
            out.append(f"variant {v.name!r}: malformed arXiv id {paper.arxiv!r}")
    return out


# -- counts and documents --------------------------------------------------------------------------


def counts(rows=ROWS) -> dict[int, dict[str, int]]:
    """Per family number, how many rows have each status."""
    out = {f: dict.fromkeys(STATUSES, 0) for f in FAMILIES}
    for r in rows:
        out[r.family][r.status] += 1
    return out


def totals(rows=ROWS) -> dict[str, int]:
    out = dict.fromkeys(STATUSES, 0)
    for r in rows:
        out[r.status] += 1
    return out


def counts_table(rows=ROWS) -> str:
    """Markdown: per family, implemented / out of scope / missing, and the totals."""
    lines = ["| family | papers | implemented | out of scope | missing |", "|---|---:|---:|---:|---:|"]
    for f, c in counts(rows).items():
        lines.append(f"| {f}. {FAMILIES[f]} | {sum(c.values())} | {c[IMPLEMENTED]} | {c[OUT_OF_SCOPE]} | {c[MISSING]} |")
    t = totals(rows)
    lines.append(f"| **all** | **{len(rows)}** | **{t[IMPLEMENTED]}** | **{t[OUT_OF_SCOPE]}** | **{t[MISSING]}** |")
    return "\n".join(lines)


def summary_line(rows=ROWS) -> str:
    t = totals(rows)
    return (f"{len(rows)} seed papers: {t[IMPLEMENTED]} implemented, {t[OUT_OF_SCOPE]} out of scope, "
            f"{t[MISSING]} missing")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _offers(r: Row) -> str:
    return ", ".join(f"`{n}`" for n in r.offers)


def markdown(rows=ROWS) -> str:
    """The whole of ``docs/coverage.md``."""
    from . import catalog

    head = [
        "# Coverage of the seed papers",
        "",
        "<!-- generated by `make readme` (python -m multihead.readme) from src/multihead/coverage.py; "
        "do not edit -->",
        "",
        "Every paper of the seed catalogue (`shared/reference/seed-papers.md`, \"Catalogue by family\") "
        "that describes a concrete mechanism, tool, analysis or benchmark, and what multihead offers "
        "for it. **implemented**: the named objects exist and the named tests check them against the "
        "paper's formula; **out of scope**: the reason; **missing**: not built yet, with what it would "
        "take (names in a missing row are pieces that exist toward it). Names are under `multihead.` "
        "(`variant:x` is the catalog variant `x`, `multihead list`); tests are under `tests/`. "
        "`multihead list --seeds` prints the counts.",
        "",
        f"{summary_line(rows)}.",
        "",
        counts_table(rows),
        "",
        "How the mechanisms added for the seed papers are built (issue 17): each is a composition of the "
        "library's pieces - the attention itself (the normalised weights over a query's keys and the weighted "
        "sum of values) runs through `multihead.attention`, and a module computes only its own terms (scores, "
        "selections, summaries); the exceptions apply recomputed weights to the values in a head hook because "
        "the weights are what they work on: VAR edits them, and MoA's profiler makes them a gradient leaf to "
        "measure dL/dA. A choice made from q and k (Landmark's retrieved "
        "blocks, SeerAttention's gate, Sparsifiner's predictor, DMA's top-window keys, recycled keys) is "
        "computed without gradient and handed to `multihead.attention` as a static pattern "
        "(`patterns.blocks.BlockSelection` for blocks, `patterns.KeySelection` for keys), so every backend "
        "runs it and the block-sparse one computes only what was chosen. A term that depends on q, k or v "
        "but is constant over a block or a key (Landmark's log block weights, DMA's key weights, a pointer "
        "network's scores) is a score (`scores.blocks.BlockBias`, `scores.blocks.KeyBias`) that backends "
        "differentiate. Groupings made by sorting (FlatFormer, Histoformer) or by a fixed layout (Group Pose, "
        "LRGT, TNT) are a gather into the grouped order, `BlockLocal` or `Dilated` there, and a scatter back. "
        "Learned selectors (SeerAttention's gate, Sparsifiner's predictor) train by distillation from the "
        "dense map (`gate_loss`, `connectivity_loss`); their catalog entries freeze them, since the output "
        "gives them no gradient.",
        "",
        "Reasons for leaving a paper out:",
        "",
        *[f"- `{k}`: {v}" for k, v in REASONS.items()],
        "",
    ]
    body = []
    for f, name in FAMILIES.items():
        family_rows = [r for r in rows if r.family == f]
        if not family_rows:
            continue
        body += [f"## {f}. {name}", "", "| paper | status | multihead offers | tested by | note |",
                 "|---|---|---|---|---|"]
        for r in family_rows:
            status = r.status if r.status != OUT_OF_SCOPE else f"out of scope: `{r.reason}`"
            tests = "<br>".join(f"`{t}`" for t in r.tests)
            body.append(f"| {_cell(r.paper)} | {status} | {_offers(r)} | {tests} | {_cell(r.note)} |")
        body.append("")
    beyond = [v for v in catalog.CATALOG.values() if v.name not in variants_covered()]
    body += ["## Catalog variants beyond the seed papers", "",
             "Variants of `multihead list` whose paper is not a seed paper (baselines and the papers they "
             "build on):", "",
             "| variant | family | paper |", "|---|---|---|"]
    body += [f"| `{v.name}` | {v.family} | {_cell(v.paper.cite())} |" for v in beyond]
    return "\n".join(head + body) + "\n"


def parse_seed_catalogue(text: str) -> list[tuple[int, str]]:
    """``(family number, paper)`` of every row of the seed catalogue's "Catalogue by family" tables."""
    out, family = [], None
    for line in text.splitlines():
        if line.startswith("## ") and family is not None:
            break
        heading = re.match(r"### (\d+)\. ", line)
        if heading:
            family = int(heading.group(1))
            continue
        if family is not None and line.startswith("| ") and not line.startswith(("| Paper ", "|---")):
            out.append((family, line.split("|")[1].strip()))
    return out
