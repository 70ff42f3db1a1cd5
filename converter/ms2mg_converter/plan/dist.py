"""torch_dist names: where each plan entry goes in Megatron's distributed checkpoint (pure, no torch).

A `torch_dist` plan has one file of global tensors, every layer at its global number
(`decoder.layers.<l>.<name>`). Megatron stores those stacked: one tensor `decoder.layers.<name>` of shape
`[num_layers, ...]`, written as one chunk per layer at offset `[l, 0, ...]`; `_extra_state` entries become
byte entries `<key>/shard_<l>_<num_layers>` (outside the layers `/shard_0_1`). Everything else keeps its key
and shape (torch-dist-format.md §4.2, §4.3, §6).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ms2mg_converter.plan.entries import ITERATION_DIR, Entry, ExtraEntry, FilePlan, TensorEntry

DIST_FILE = "__0_0.distcp"
METADATA = ".metadata"
COMMON = "common.pt"
CONFIG = "metadata.json"
CONFIG_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
               "common_backend": "torch", "common_backend_version": 1}
"""Exactly the fields megatron-core 0.12-0.18 write (and accept: an extra key is a TypeError there)."""
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
"""`common.pt`'s content_metadata: pins the stacked layer layout."""
SMALL_FILES = (f"{ITERATION_DIR}/{METADATA}", f"{ITERATION_DIR}/{COMMON}", f"{ITERATION_DIR}/{CONFIG}")

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class DistChunk:
    """One stored chunk of a (global) tensor: the plan entry that fills it and where it sits."""

    entry: TensorEntry
    fqn: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]

    @property
    def size(self) -> tuple[int, ...]:
        """The chunk's shape: `[1, ...]` for a layer of a stacked tensor, else the whole tensor."""
        return (1, *self.entry.shape) if len(self.offset) > len(self.entry.shape) else self.entry.shape


@dataclass(frozen=True)
class DistBytes:
    """One byte entry (an `_extra_state`, stored as `torch.save([None])`)."""

    fqn: str


def dist_item(entry: Entry, num_layers: int) -> DistChunk | DistBytes:
    m = _LAYER.match(entry.key)
    if isinstance(entry, ExtraEntry):
        if m is None:
            return DistBytes(f"{entry.key}/shard_0_1")
        return DistBytes(f"decoder.layers.{m.group(2)}/shard_{m.group(1)}_{num_layers}")
    if m is None:
        return DistChunk(entry, entry.key, entry.shape, (0,) * len(entry.shape))
    layer = int(m.group(1))
    return DistChunk(entry, f"decoder.layers.{m.group(2)}", (num_layers, *entry.shape),
                     (layer,) + (0,) * len(entry.shape))


def dist_items(fp: FilePlan, num_layers: int) -> list[DistChunk | DistBytes]:
    """Every item of the data file, in file order."""
    return [dist_item(e, num_layers) for e in fp.entries()]
