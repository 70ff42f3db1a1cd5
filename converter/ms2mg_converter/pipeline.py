"""Pipeline stages and virtual chunks: which global layers each (stage, chunk) holds, and when that is impossible.

Numbers only (no torch): the converter plans rank files with it, `checks.parallelism_problems` (which the
operator runs before a Job starts) reports its problems.

Megatron's rules, which this module mirrors (megatron-core 0.16.1 `transformer/transformer_block.py
get_num_layers_to_build`, `transformer/transformer_layer.py get_transformer_layer_offset`,
`TransformerConfig.__post_init__` "Uneven PP"; Megatron-LM `megatron/training/arguments.py validate_args`,
core_r0.12.0):

* Stage sizes: without `--decoder-first/last-pipeline-num-layers` every stage holds num_layers / PP. With
  them, the first (last) stage holds the given number and the stages in between share the rest evenly; with
  no stage in between the given numbers must add up to num_layers.
* Virtual chunks (interleaved schedule): each stage's layers are cut into V equal chunks, and chunks are
  numbered round-robin over the stages: chunk v of stage p follows chunk v of stage p-1, and chunk v of the
  first stage follows chunk v-1 of the last stage. With 8 layers, PP 2, V 2: stage 0 holds [0,1] [4,5],
  stage 1 holds [2,3] [6,7]. V comes from `--num-virtual-stages-per-pipeline-rank`, or from
  `--num-layers-per-virtual-pipeline-stage` as (num_layers / PP) / that number; Megatron refuses the latter
  with uneven stages, and virtual chunks with PP 1.
* The embedding lives in the first chunk of the first stage, the final norm and output layer in the last
  chunk of the last stage. A rank file holds one state dict per chunk: `model` for one chunk, `model0`,
  `model1`, ... for more (Megatron-LM `checkpointing.py generate_state_dict`, `len(model) > 1`), each with
  layer numbers counted from 0 inside the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

from ms2mg_converter.config import PipelineLayout

FIRST = "--decoder-first-pipeline-num-layers"
LAST = "--decoder-last-pipeline-num-layers"
PER_VIRTUAL = "--num-layers-per-virtual-pipeline-stage"
VIRTUAL = "--num-virtual-stages-per-pipeline-rank"
PP = "--target-pipeline-parallel-size"


@dataclass(frozen=True)
class ChunkPlacement:
    """One model chunk of one pipeline stage."""

    key: str
    """The rank file's dict key: `model`, or `model0`, `model1`, ... with more than one chunk per stage."""
    layers: range
    """Global layer numbers; inside the chunk they are numbered from 0."""
    pre_process: bool
    """Holds the embedding (first chunk of the first stage)."""
    post_process: bool
    """Holds the final norm and the output layer (last chunk of the last stage)."""


def _uneven(layout: PipelineLayout) -> bool:
    return layout.decoder_first_pipeline_num_layers is not None or layout.decoder_last_pipeline_num_layers is not None


def virtual_stages(num_layers: int, pp: int, layout: PipelineLayout) -> int | None:
    """Megatron's `virtual_pipeline_model_parallel_size` for these flags (None: no virtual chunks)."""
    if layout.num_virtual_stages_per_pipeline_rank is not None:
        return layout.num_virtual_stages_per_pipeline_rank
    if layout.num_layers_per_virtual_pipeline_stage is not None:
        return num_layers // pp // layout.num_layers_per_virtual_pipeline_stage
    return None


def _stage_sizes(num_layers: int, pp: int, layout: PipelineLayout) -> list[int]:
    first, last = layout.decoder_first_pipeline_num_layers, layout.decoder_last_pipeline_num_layers
    middle = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    sizes = [rest // middle if middle else 0] * pp
    if first is not None:
        sizes[0] = first
    if last is not None:
        sizes[-1] = last
    return sizes


def placements(num_layers: int, pp: int, layout: PipelineLayout) -> list[list[ChunkPlacement]]:
    """[stage][chunk] -> placement, for a layout without `layout_problems`."""
    sizes = _stage_sizes(num_layers, pp, layout)
    v = virtual_stages(num_layers, pp, layout) or 1
    starts = [[0] * v for _ in range(pp)]
    at = 0
    for c in range(v):  # round-robin: all stages' chunk c before any stage's chunk c + 1
        for p in range(pp):
            starts[p][c] = at
            at += sizes[p] // v
    assert at == num_layers, (num_layers, pp, layout)
    return [[ChunkPlacement("model" if v == 1 else f"model{c}", range(starts[p][c], starts[p][c] + sizes[p] // v),
                            p == 0 and c == 0, p == pp - 1 and c == v - 1) for c in range(v)] for p in range(pp)]


def _flag_problems(pp: int, layout: PipelineLayout) -> list[str]:
    """What is wrong whatever the number of layers."""
    problems = []
    first, last = layout.decoder_first_pipeline_num_layers, layout.decoder_last_pipeline_num_layers
    per_virtual, v = layout.num_layers_per_virtual_pipeline_stage, layout.num_virtual_stages_per_pipeline_rank
    if per_virtual is not None and v is not None:
        problems.append(f"give only one of {PER_VIRTUAL} and {VIRTUAL} (Megatron refuses both)")
    if (per_virtual is not None or v is not None) and pp < 2:
        problems.append(f"{PER_VIRTUAL if per_virtual is not None else VIRTUAL} needs pipeline parallel size > 1 "
                        f"({PP} is {pp}): virtual chunks interleave pipeline stages")
    if _uneven(layout) and pp < 2:
        problems.append(f"{FIRST if first is not None else LAST} needs pipeline parallel size > 1 ({PP} is {pp})")
    if per_virtual is not None and _uneven(layout):
        problems.append(f"{PER_VIRTUAL} cannot be combined with {FIRST} / {LAST}; give the number of virtual "
                        f"chunks per stage as {VIRTUAL} instead (Megatron's rule)")
    for flag, value in ((FIRST, first), (LAST, last)):
        if v is not None and value is not None and value % v:
            problems.append(f"{flag} ({value}) is not divisible by {VIRTUAL} ({v})")
    return problems


def _even_problems(num_layers: int, pp: int, layout: PipelineLayout) -> list[str]:
    if num_layers < pp:
        return [f"num_layers ({num_layers}) is smaller than pipeline parallel size ({pp})"]
    if num_layers % pp:
        return [f"num_layers ({num_layers}) is not divisible by pipeline parallel size ({pp}); give "
                f"{FIRST} / {LAST} for uneven stages"]
    per_stage = num_layers // pp
    per_virtual, v = layout.num_layers_per_virtual_pipeline_stage, layout.num_virtual_stages_per_pipeline_rank
    if per_virtual is not None and per_stage % per_virtual:
        return [f"the {per_stage} layers per pipeline stage are not divisible by {PER_VIRTUAL} ({per_virtual})"]
    if v is not None and per_stage % v:
        return [f"the {per_stage} layers per pipeline stage are not divisible by {VIRTUAL} ({v})"]
    return []


def _uneven_problems(num_layers: int, pp: int, layout: PipelineLayout) -> list[str]:
    first, last = layout.decoder_first_pipeline_num_layers, layout.decoder_last_pipeline_num_layers
    given = " + ".join(f"{flag} ({n})" for flag, n in ((FIRST, first), (LAST, last)) if n is not None)
    middle = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if middle == 0 and rest:
        return [f"with pipeline parallel size {pp}, {given} must add up to num_layers ({num_layers})"]
    if middle == 0:
        # megatron-core's get_transformer_layer_offset divides by the number of stages in between when it
        # places virtual chunks on uneven stages (0.16.1 and core_r0.12.0): such a model cannot be built
        return [] if layout.num_virtual_stages_per_pipeline_rank is None else [
            f"{given} with {VIRTUAL} and no stage in between cannot be loaded (megatron-core's layer offset "
            f"divides by the number of stages in between, 0); give only {FIRST}, the last stage gets the rest"]
    if rest < middle:
        return [f"{given} leave {max(rest, 0)} of the {num_layers} layers for the {middle} other stage(s); each "
                "needs at least one"]
    if rest % middle:
        return [f"the {rest} layers left after {given} are not divisible by the {middle} other stage(s)"]
    v = layout.num_virtual_stages_per_pipeline_rank
    if v is not None and (rest // middle) % v:
        return [f"the {rest // middle} layers of each other stage are not divisible by {VIRTUAL} ({v})"]
    return []


def layout_problems(num_layers: int | None, pp: int, layout: PipelineLayout) -> list[str]:
    """Every reason `layout` cannot place `num_layers` layers on `pp` stages (empty when it can).

    With `num_layers` None only the rules between the flags themselves are checked."""
    problems = _flag_problems(pp, layout)
    if num_layers is None or problems or pp < 1:
        return problems
    if _uneven(layout):
        return _uneven_problems(num_layers, pp, layout)
    return _even_problems(num_layers, pp, layout)


def describe(num_layers: int, pp: int, layout: PipelineLayout) -> list[str]:
    """One line per stage: its chunks and their global layers (for `ms2mg inspect`)."""
    lines = []
    for p, chunks in enumerate(placements(num_layers, pp, layout)):
        parts = [f"{c.key} {_span(c.layers)}" + (" +embedding" if c.pre_process else "") +
                 (" +final norm/output" if c.post_process else "") for c in chunks]
        lines.append(f"stage {p}: " + ", ".join(parts))
    return lines


def _span(layers: range) -> str:
    if len(layers) == 1:
        return f"layer {layers.start}"
    return f"layers {layers.start}-{layers.stop - 1}"
