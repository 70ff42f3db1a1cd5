"""Keys that are never model weights: optimizer state and training bookkeeping (dropped and listed).

Optimizer spellings, from MindFormers mindformers/core/optim/ (read for facts): `adam_m.`/`adam_v.`
(AdamWeightDecay-style moments; also Muon), `exp_avg.`/`exp_avg_sq.`/`max_exp_avg_sq.` (AdamW, FusedAdamW
with amsgrad), `muon_m.` (Muon), `pma_weight_ema.`/`pma_weight_sma.` (PmaAdamW), CAME's `exp_avg.` plus
`exp_avg_sq_row_<p>`, `exp_avg_sq_col_<p>`, `exp_avg_insta_row_<p>`, `exp_avg_insta_col_<p>`, `exp_avg_sq_<p>`
(underscore, no dot) and `afactor_step`; `accu_grads.` (gradient accumulation) and `moments.` (Momentum).
MoE run-time counters (shared/docs/mindformers-moe-mla-distributed.md §1.1): `router.expert_load`,
`router.fi_accu`, `experts.num_tokens_per_expert`, `expert_load_history[_cnt]`, `expert_mapping`.
"""

from __future__ import annotations

import fnmatch

DROPPED: tuple[str, ...] = (
    "adam_m.*", "adam_v.*", "exp_avg.*", "exp_avg_sq.*", "max_exp_avg_sq.*", "muon_m.*", "pma_weight_*",
    "exp_avg_sq_row_*", "exp_avg_sq_col_*", "exp_avg_insta_row_*", "exp_avg_insta_col_*", "exp_avg_sq_*",
    "accu_grads.*", "moments.*", "*.moments.*",
    "global_step", "epoch_num", "step_num", "loss_scale", "scale_sense", "current_iterator_step",
    "last_overflow_iterator_step", "learning_rate", "beta1_power", "beta2_power", "afactor_step",
    "*dropout*", "*.inv_freq", "*max_logits_val*",
    "*.mlp.router.expert_load", "*.mlp.router.fi_accu", "*.mlp.experts.num_tokens_per_expert",
    "*.mlp.expert_load_history", "*.mlp.expert_load_history_cnt", "*.mlp.expert_mapping",
)
"""Optimizer state and training bookkeeping found in MindFormers checkpoints: never model weights."""

MTP: tuple[str, ...] = ("mtp.*",)
"""DeepSeek-V3 / TeleChat3 multi-token-prediction layers (`mtp.layers.{k}.*`, mindformers-moe-mla-distributed.md
§2.3): a training-only head the converted GPT model does not build; dropped and listed (result, manifest)."""


def is_dropped(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in (*DROPPED, *MTP))
