"""Will it fit? Per-rank memory of a fine-tuning run, predicted before any hardware is rented.

The package, by job: shape (the model a run trains, counted on the meta device), memory (per-rank bytes of
weights, gradients, optimizer states and activations from the shape and the plugin's Placement record), fit
(whether a run fits in the memory available, and the cheapest changes that make it) and cli (`python -m
finetune.estimate`: the request, the table, --fit, --json; its help sums up the formulas).
"""

from __future__ import annotations

from finetune.estimate.cli import BOOSTER_CONFIGS, DEVICES, ESTIMATOR_KEYS, SHORT_KEYS, estimate_request, format_table, main, parse_request
from finetune.estimate.fit import IGNORED_PROBLEMS, Alternative, fit_check_line, fitting_alternatives, format_fit, ignored_problems, with_overrides
from finetune.estimate.memory import (
    CPU_AFTER_START_BYTES,
    CHUNKED_LOSS_TOKEN_BYTES,
    CPU_PROCESS_BYTES,
    CPU_START_BYTES,
    CUDA_CONTEXT_BYTES,
    DTYPE_BYTES,
    GIB,
    MIB,
    Estimate,
    OffloadedActivations,
    Quantization,
    Share,
    StateBytes,
    activation_peaks,
    compare_with_run,
    estimate,
    eval_peak_bytes,
    in_flight,
    layer_activation_bytes,
    loss_peak_bytes,
    norm_bytes,
    offloaded_activations,
    outside_activation_bytes,
    pipeline_layers,
    placement,
    quantization_of,
    rank_share,
    state_bytes,
    vocab_parallel_loss_bytes,
)
from finetune.core.loss_chunks import DEFAULT_CHUNK_TOKENS
from finetune.estimate.shape import PROJECTION_ROLES, EstimateError, ModelShape, build_meta_model, is_classifier, load_model_config, model_shape

__all__ = [
    "BOOSTER_CONFIGS", "CHUNKED_LOSS_TOKEN_BYTES", "CPU_AFTER_START_BYTES", "DEFAULT_CHUNK_TOKENS", "CPU_PROCESS_BYTES", "CPU_START_BYTES", "CUDA_CONTEXT_BYTES", "DEVICES", "DTYPE_BYTES", "ESTIMATOR_KEYS",
    "GIB", "IGNORED_PROBLEMS", "MIB", "PROJECTION_ROLES", "SHORT_KEYS", "Alternative", "Estimate", "EstimateError", "ModelShape", "OffloadedActivations", "Quantization",
    "Share", "StateBytes", "activation_peaks", "build_meta_model", "compare_with_run", "estimate", "estimate_request", "eval_peak_bytes",
    "fit_check_line", "fitting_alternatives", "format_fit", "format_table", "ignored_problems", "in_flight", "is_classifier", "layer_activation_bytes",
    "load_model_config", "loss_peak_bytes", "main", "model_shape", "norm_bytes", "offloaded_activations", "outside_activation_bytes", "parse_request", "pipeline_layers",
    "placement", "quantization_of", "rank_share", "state_bytes", "vocab_parallel_loss_bytes", "with_overrides",
]  # fmt: skip
