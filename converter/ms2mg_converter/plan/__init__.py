"""Plan: every output file, every entry in it and the source rows that fill it, from headers only (no torch).

* `target`: where Megatron puts each tensor (split kind per tensor, pipeline placement, key names and order);
* `entries`: the plan's data (`Plan`, `FilePlan`, `Chunk`, `Group`, `TensorEntry`, `ExtraEntry`, `Read`);
* `build`: `build_plan(config)`: source view + architecture -> bound layout operations -> rank slices.

Public names: `build_plan`, `layout_op`, `Plan`, `FilePlan`, `Chunk`, `Group`, `TensorEntry`, `ExtraEntry`,
`Entry`, `Read`, `TRACKER`.
"""

from ms2mg_converter.plan.build import build_plan, check_parallelism, layout_op
from ms2mg_converter.plan.entries import (
    CHECKPOINT_FILE,
    DTYPE_BYTES,
    ITERATION_DIR,
    TRACKER,
    Chunk,
    Entry,
    ExtraEntry,
    FilePlan,
    Group,
    Plan,
    Read,
    TensorEntry,
)

__all__ = ["CHECKPOINT_FILE", "DTYPE_BYTES", "ITERATION_DIR", "TRACKER", "Chunk", "Entry", "ExtraEntry", "FilePlan",
           "Group", "Plan", "Read", "TensorEntry", "build_plan", "check_parallelism", "layout_op"]
