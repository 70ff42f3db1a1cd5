"""Keys that are never model weights: optimizer state and training bookkeeping (dropped and listed)."""

from __future__ import annotations

import fnmatch

DROPPED: tuple[str, ...] = (
    "adam_m.*", "adam_v.*", "accu_grads.*", "moments.*", "*.moments.*",
    "global_step", "epoch_num", "step_num", "loss_scale", "scale_sense", "current_iterator_step",
    "last_overflow_iterator_step", "learning_rate", "beta1_power", "beta2_power",
    "*dropout*", "*.inv_freq", "*max_logits_val*",
)
"""Optimizer state and training bookkeeping found in MindFormers checkpoints: never model weights."""


def is_dropped(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in DROPPED)
