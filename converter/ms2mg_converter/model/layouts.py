"""The row order of fused source tensors: stated by flags, the YAML or the family, never guessed.

A fused linear_qkv or SwiGLU linear_fc1 loads fine in any row order and computes wrong outputs in the
wrong one, so where the order matters (`LayoutOp.layout_matters`) it must be stated: `--qkv-layout` /
`--fc1-layout`, the MindFormers YAML's layout flags, or the family when its code writes only one order.
Contiguous orders ([Q;K;V], [gate; up]) are per training tensor-parallel rank, so the source TP size
(`--source-tensor-parallel-size` or the YAML's `parallel_config.model_parallel`) must be known for a
contiguous QKV.
"""

from __future__ import annotations

from typing import TypeVar

from ms2mg_converter.config import Fc1Layout, LayoutConfig, QkvLayout
from ms2mg_converter.errors import ParallelismError, UsageError
from ms2mg_converter.layout import Dims
from ms2mg_converter.names import FC1, QKV, SHARED_FC1
from ms2mg_converter.source.resolve import SourceView

HELP = {
    "qkv": "--qkv-layout grouped (Megatron's order; MindFormers r1.7+ default, "
           "use_contiguous_weight_layout_attention: False) or --qkv-layout contiguous ([Q;K;V]; MindFormers "
           "r1.6/dev default)",
    "fc1": "--fc1-layout interleaved (rows gate,up,gate,up; MindFormers r1.7+ default, "
           "use_interleaved_weight_layout_mlp: True) or --fc1-layout gate-up ([gate; up], Megatron's order)",
}
"""What to pass, for families that do not say more (`Family.layout_help`)."""

_E = TypeVar("_E", QkvLayout, Fc1Layout)


def _matters(view: SourceView, target: str, flag: str, dims: Dims) -> bool:
    """Whether the tensor `target` is built by an operation whose `flag` layout matters for this model."""
    for layer in view.layers:
        logical = view.get(target, layer)
        if logical is not None:
            return logical.recipe.op.layout_flag == flag and logical.recipe.op.layout_matters(dims)
    return False


def _stated(view: SourceView, flag: str, given: _E | None, default: str | None, enum: type[_E]) -> _E:
    if given is not None:
        return given
    if default is not None:
        return enum(default)
    tensor = "fused linear_qkv" if flag == "qkv" else "fused SwiGLU linear_fc1"
    how = view.family.layout_help.get(flag, HELP[flag])
    raise UsageError(f"the row order of the {tensor} ({view.family.name} family) cannot be read from the tensors: "
                     f"pass {how}, or --config MODEL.yaml when it states the layout. A wrong choice loads fine "
                     "and gives wrong outputs, so ms2mg does not guess.")


def _source_tp(given: int | None, qkv: QkvLayout | None, dims: Dims) -> int:
    if given is None:
        if qkv is QkvLayout.CONTIGUOUS:
            raise UsageError("a contiguous fused linear_qkv is [Q;K;V] per tensor-parallel rank of the training "
                             "run ([Q_0;K_0;V_0; Q_1;K_1;V_1; ...]), so the training's TP size must be known: "
                             "pass --source-tensor-parallel-size N (the training YAML's "
                             "parallel_config.model_parallel) or --config with that YAML.")
        return 1
    problems = [f"{what} ({n})" for what, n in (("num_attention_heads", dims.num_attention_heads),
                                              ("num_query_groups", dims.num_query_groups),
                                              ("ffn_hidden_size", dims.ffn_hidden_size)) if n % given]
    if problems:
        raise ParallelismError(f"--source-tensor-parallel-size {given} does not divide {', '.join(problems)}: "
                               "the source cannot have been trained with that tensor-parallel size.")
    return given


def resolve_layouts(view: SourceView, layouts: LayoutConfig, dims: Dims) -> tuple[
        QkvLayout | None, Fc1Layout | None, int]:
    """The QKV layout, the fc1 layout (None where it does not matter) and the source TP size."""
    family = view.family
    qkv = fc1 = None
    if _matters(view, QKV + ".weight", "qkv", dims):
        qkv = _stated(view, "qkv", layouts.qkv, family.fused_qkv_default, QkvLayout)
    if _matters(view, FC1 + ".weight", "fc1", dims) or _matters(view, SHARED_FC1 + ".weight", "fc1", dims):
        fc1 = _stated(view, "fc1", layouts.fc1, family.fused_fc1_default, Fc1Layout)
    return qkv, fc1, _source_tp(layouts.source_tensor_parallel, qkv, dims)
