"""The architecture of the source model, inferred from tensor names and shapes and checked against flags.

Layers, hidden and ffn sizes, vocabulary rows, SwiGLU, biases, tied/untied output, q/k norms, the norm
type and learned positions all follow from the headers. Heads and query groups cannot (a fused QKV only
tells (heads + 2*groups) * head_dim), so they come from flags or the MindFormers YAML. Every value the
user gave is compared with what the tensors say, and a contradiction is an error before any tensor data
is read.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ms2mg_converter.checks import padded_vocab_size, parallelism_problems
from ms2mg_converter.config import (
    ConvertConfig,
    Fc1Layout,
    LayoutConfig,
    ModelOverrides,
    MoeConfig,
    Normalization,
    PositionEmbedding,
    QkvLayout,
)
from ms2mg_converter.errors import MissingKeyError, ParallelismError, ShapeError, UsageError
from ms2mg_converter.model.facts import resolve_facts
from ms2mg_converter.model.layouts import resolve_layouts
from ms2mg_converter.model.mla import MlaDims, check_mla_layers, infer_mla, is_mla, mla_qk_layernorm, without_dense_qkv
from ms2mg_converter.model.moe import MoeArch, first_dense_layer, infer_moe, is_mlp
from ms2mg_converter.names import EMBED, FC1, FC2, FINAL, NORMS, OUTPUT, POS, PROJ, QK_NORMS, QKV, ROUTER
from ms2mg_converter.source.resolve import Logical, SourceView


class Architecture(BaseModel):
    """Everything the planner needs to know about the model, fully resolved."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    swiglu: bool
    add_bias_linear: bool
    add_qkv_bias: bool
    qk_layernorm: bool
    untie_embeddings_and_output_weights: bool
    normalization: Normalization
    position_embedding_type: PositionEmbedding
    source_vocab_rows: int
    true_vocab_size: int | None
    padded_vocab_size: int
    seq_length: int
    max_position_embeddings: int
    rotary_base: float
    rotary_percent: float
    rotary_interleaved: bool = False
    norm_epsilon: float
    qkv_layout: QkvLayout | None
    fc1_layout: Fc1Layout | None
    source_tensor_parallel: int = 1
    """TP size the source was trained with (contiguous fused layouts are per source rank)."""
    moe: MoeArch | None = None
    """Mixture of experts (`model.moe`); None: a dense model."""
    defaulted: tuple[str, ...] = ()
    """Model facts nothing stated (flags, YAML, family), set to Megatron's defaults (`model.facts`)."""
    mla: MlaDims | None = None
    """Multi-latent attention sizes and RoPE facts (`model.mla`); None: grouped-query attention."""


def _shape(view: SourceView, target: str, layer: int | None = None) -> tuple[int, ...] | None:
    logical = view.get(target, layer)
    return None if logical is None else _logical_shape(logical)


def _logical_shape(logical: Logical) -> tuple[int, ...]:
    return logical.recipe.op.logical_shape([i.shape for i in logical.inputs])


def _require(view: SourceView, target: str, layer: int | None = None) -> tuple[int, ...]:
    shape = _shape(view, target, layer)
    if shape is None:
        where = f"decoder layer {layer}" if layer is not None else "the model"
        raise MissingKeyError(f"{where} has no {target.replace('{layer}', str(layer))} (in any of the "
                              f"{view.family.name} spellings). The checkpoint is incomplete or truncated.")
    return shape


def _expect(name: str, shape: tuple[int, ...], expected: tuple[int, ...], why: str) -> None:
    if shape != expected:
        raise ShapeError(f"tensor {name} has shape {list(shape)}, expected {list(expected)} ({why}).")


def _check_layers(view: SourceView) -> int:
    layers = view.layers
    if not layers:
        raise MissingKeyError("the source holds no decoder layer (decoder.layers.N.* / model.layers.N.*).")
    missing = sorted(set(range(max(layers) + 1)) - set(layers))
    if missing:
        raise MissingKeyError(f"decoder layer(s) {missing[:10]} are missing while layer {max(layers)} exists; "
                              "the checkpoint is incomplete (a shard missing from --load-dir?).")
    attention0 = {t for (t, lay) in view.logical if lay == layers[0] and not is_mlp(t)}
    first: dict[bool, tuple[int, set[str]]] = {}  # dense layers alike, MoE layers alike, attention in all
    for layer in layers:
        here = {t for (t, lay) in view.logical if lay == layer}
        moe = ROUTER in here  # a MoE layer's MLP is checked by model.moe (with messages about experts)
        other, ref = first.setdefault(moe, (layer, here))
        checks = [({t for t in here if not is_mlp(t)}, attention0, layers[0])] + ([] if moe else [(here, ref, other)])
        for theirs, mine, where in checks:
            if theirs != mine:
                diff = sorted(theirs ^ mine)[0].replace("{layer}", str(layer))
                raise MissingKeyError(f"decoder layer {layer} and layer {where} hold different tensors (e.g. "
                                      f"{diff}); every layer must have the same parameters (MoE layers: those "
                                      "of the other MoE layers).")
    return len(layers)


def _heads(view: SourceView, given: ModelOverrides, hidden: int, qkv_rows: int) -> tuple[int, int, int]:
    heads = given.num_attention_heads
    if heads is None:
        raise UsageError("the number of attention heads cannot be read from the tensors: pass "
                         "--num-attention-heads (and --num-query-groups for GQA) or --config MODEL.yaml.")
    logical = view.get(QKV + ".weight", 0)
    head_dim = given.kv_channels
    qk = _shape(view, QK_NORMS[0] + ".weight", 0)
    if head_dim is None and qk is not None:
        head_dim = qk[0]
    shapes = [i.shape for i in logical.inputs] if logical is not None else []
    if head_dim is None and logical is not None:
        head_dim = logical.recipe.op.infer_head_dim(shapes, heads)
    head_dim = head_dim or hidden // heads
    groups = given.num_query_groups
    if groups is None and logical is not None:
        groups = logical.recipe.op.infer_groups(shapes, head_dim)
    if groups is None:
        implied = (qkv_rows // head_dim - heads) / 2 if head_dim else 0
        raise UsageError(f"the number of query groups cannot be read from a fused linear_qkv: pass "
                         f"--num-query-groups or --config MODEL.yaml (with head dim {head_dim} the "
                         f"{qkv_rows} qkv rows imply {implied:g}).")
    return heads, groups, head_dim


def _check_attention(view: SourceView, layer: int, a: Architecture) -> None:
    h, heads, groups, d = a.hidden_size, a.num_attention_heads, a.num_query_groups, a.kv_channels
    if heads % groups:
        raise UsageError(f"num_attention_heads ({heads}) is not divisible by num_query_groups ({groups}).")
    qkv = view.get(QKV + ".weight", layer)
    assert qkv is not None
    rows = qkv.recipe.op.input_rows(a) or ((heads + 2 * groups) * d,)
    why = (f"(heads {heads} + 2 x groups {groups}) x head dim {d} rows, hidden {h} columns" if len(rows) == 1
           else f"{heads} heads, {groups} groups, head dim {d}")
    for info, n in zip(qkv.inputs, rows, strict=True):
        _expect(info.name, info.shape, (n, h), why)
    proj = view.get(PROJ + ".weight", layer)
    assert proj is not None
    _expect(proj.inputs[0].name, proj.inputs[0].shape, (h, heads * d), f"hidden {h} x heads*head_dim {heads * d}")
    for name in QK_NORMS:
        logical = view.get(name + ".weight", layer)
        if logical is not None:
            _expect(logical.inputs[0].name, logical.inputs[0].shape, (d,), f"q/k norm over head dim {d}")


def _mlp(view: SourceView, h: int, moe: MoeArch | None) -> tuple[int, bool]:
    dense = first_dense_layer(view)
    if moe is not None and dense is None:  # every layer MoE: Megatron's ffn_hidden_size is the expert width
        return moe.moe_ffn_hidden_size, True
    fc2 = _require(view, FC2 + ".weight", dense or 0)
    if len(fc2) != 2 or fc2[0] != h:
        raise ShapeError(f"linear_fc2.weight of layer 0 has shape {list(fc2)}, expected [{h}, ffn].")
    ffn = fc2[1]
    fc1 = view.get(FC1 + ".weight", dense or 0)
    if fc1 is None:
        raise MissingKeyError(f"layer {dense or 0} has linear_fc2 but no linear_fc1; the checkpoint is incomplete.")
    rows = _logical_shape(fc1)
    if rows not in ((2 * ffn, h), (ffn, h)):
        raise ShapeError(f"linear_fc1.weight of layer 0 has shape {list(rows)}; with fc2 {list(fc2)} it must "
                         f"be [{2 * ffn}, {h}] (SwiGLU) or [{ffn}, {h}].")
    return ffn, rows[0] == 2 * ffn


def _layer_shapes(view: SourceView, a: Architecture) -> None:
    """Every layer's tensors against the architecture (layer 0 was used to infer it)."""
    qkv_rows = (a.num_attention_heads + 2 * a.num_query_groups) * a.kv_channels
    fc1_rows = (2 if a.swiglu else 1) * a.ffn_hidden_size
    h = a.hidden_size
    expected = {NORMS[0]: (h,), NORMS[1]: (h,), QKV: (qkv_rows,), PROJ: (h,), FC1: (fc1_rows,), FC2: (h,)}
    weights = {QKV: (qkv_rows, h), PROJ: (h, a.num_attention_heads * a.kv_channels), FC1: (fc1_rows, h),
               FC2: (h, a.ffn_hidden_size)}
    if a.mla is not None:
        check_mla_layers(view, a)
        del expected[QKV], weights[QKV]
    for layer in range(a.num_layers):
        if a.mla is None:
            _check_attention(view, layer, a)
        for base, shape in weights.items():
            logical = view.get(base + ".weight", layer)
            if logical is None and base in (FC1, FC2) and a.moe is not None and a.moe.is_moe(layer):
                continue
            if logical is None:
                raise MissingKeyError(f"layer {layer} has no {base.replace('{layer}', str(layer))}.weight "
                                      "(nor a MoE router); the checkpoint is incomplete.")
            _expect(logical.name, _logical_shape(logical), shape, "as in layer 0")
        for base, vec in expected.items():
            for suffix in (".bias",) if base not in NORMS else (".weight", ".bias"):
                logical = view.get(base + suffix, layer)
                if logical is not None and logical.inputs:  # no inputs: synthesized (zeros) in this shape
                    _expect(logical.name, _logical_shape(logical), vec, "one value per output row")


def _biases(view: SourceView) -> tuple[bool, bool]:
    qkv_bias = view.get(QKV + ".bias", 0) is not None
    dense = first_dense_layer(view)
    mlp = (FC1, FC2) if dense is not None else ()  # MoE layers have no biases (MindFormers refuses them)
    others = {n: view.get(n + ".bias", dense if n in mlp else 0) is not None for n in (PROJ, *mlp)}
    if any(others.values()) and not all(others.values()):
        have = [n.rsplit(".", 1)[-1] for n, v in others.items() if v]
        raise ShapeError(f"only some linear layers have biases ({', '.join(have)}); Megatron supports biases "
                         "on all linear layers (add_bias_linear) or on linear_qkv only (add_qkv_bias).")
    if all(others.values()) and not qkv_bias:
        raise ShapeError("linear_proj/fc1/fc2 have biases but linear_qkv has none; Megatron's add_bias_linear "
                         "also gives linear_qkv a bias, so this model cannot be expressed.")
    return all(others.values()), qkv_bias


def _normalization(view: SourceView) -> Normalization:
    with_bias = [view.get(n + ".bias", 0) is not None for n in NORMS]
    final_bias = view.get(FINAL + ".bias") is not None
    if any(with_bias) or final_bias:
        if not all(with_bias) or not final_bias:
            raise ShapeError("some norms have a bias and others do not; LayerNorm needs weight and bias on "
                             "input_layernorm, pre_mlp_layernorm and final_layernorm.")
        return Normalization.LAYERNORM
    return Normalization.RMSNORM


def _vocab(view: SourceView, cfg: ConvertConfig, h: int) -> tuple[int, int | None, int]:
    emb = _require(view, EMBED)
    if len(emb) != 2 or emb[1] != h:
        raise ShapeError(f"{EMBED} has shape {list(emb)}, expected [vocab, {h}].")
    rows, true, tp = emb[0], cfg.vocab.true_vocab_size, cfg.tensor_parallel
    out = _shape(view, OUTPUT)
    if out is not None and out != emb:
        raise ShapeError(f"output_layer.weight has shape {list(out)} but the embedding has {list(emb)}.")
    if true is None:
        if rows % tp:
            raise ParallelismError(f"the embedding has {rows} rows, not divisible by TP {tp}, and no "
                             "--true-vocab-size was given: pass --true-vocab-size so the table can be padded.")
        return rows, None, rows
    if true > rows:
        raise UsageError(f"--true-vocab-size {true} is larger than the {rows} rows of {EMBED}; the table "
                         "cannot be trimmed to it. Check the tokenizer's vocabulary size.")
    return rows, true, padded_vocab_size(true, cfg.vocab.make_vocab_size_divisible_by, tp)


CHECKED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
           "kv_channels", "swiglu", "add_bias_linear", "qk_layernorm", "untie_embeddings_and_output_weights",
           "normalization", "position_embedding_type")


def _cross_check(given: ModelOverrides, arch: Architecture) -> None:
    flag = {"add_bias_linear": "add-bias-linear", "untie_embeddings_and_output_weights": "untie-embeddings-and-"
            "output-weights", "position_embedding_type": "position-embedding-type"}
    problems = []
    for name in CHECKED:
        value = getattr(given, name)
        if value is not None and value != getattr(arch, name):
            problems.append(f"--{flag.get(name, name.replace('_', '-'))} {value} but the tensors say "
                            f"{getattr(arch, name)}")
    if given.qkv_bias is not None and given.qkv_bias != arch.add_qkv_bias:
        problems.append(f"--qkv-bias {given.qkv_bias} but the tensors say {arch.add_qkv_bias}")
    if given.padded_vocab_size is not None and given.padded_vocab_size != arch.source_vocab_rows:
        problems.append(f"--padded-vocab-size {given.padded_vocab_size} but the source embedding has "
                        f"{arch.source_vocab_rows} rows (the reference pipeline needs them equal)")
    if problems:
        raise ShapeError("the model description contradicts the checkpoint: " + "; ".join(problems) +
                         ". Fix the flags (or the --config YAML), or check that --load-dir is the right model.")


def _check_split(cfg: ConvertConfig, values: ModelOverrides, vocab_rows: int) -> None:
    """The divisibility rules, as soon as the numbers are known: every problem at once, with the numbers."""
    tp = cfg.tensor_parallel
    problems = parallelism_problems(values, tp, cfg.pipeline_parallel, cfg.pipeline_layout)
    if problems and cfg.vocab.true_vocab_size is None and vocab_rows % tp:
        problems.append(f"the embedding has {vocab_rows} rows, not divisible by TP {tp}, and no "
                        "--true-vocab-size was given to pad it")
    if problems:
        raise ParallelismError(f"cannot split this model TP={cfg.tensor_parallel} x PP={cfg.pipeline_parallel}: "
                               + "; ".join(problems) + ". Choose sizes that divide these numbers.")


def merged_inputs(cfg: ConvertConfig) -> tuple[ModelOverrides, LayoutConfig]:
    """Flags over the --config YAML."""
    if cfg.config_yaml is None:
        return cfg.model, cfg.layouts
    from ms2mg_converter.source.mfyaml import read_yaml

    model, layouts = read_yaml(cfg.config_yaml)
    given = cfg.layouts
    return cfg.model.merged_over(model), LayoutConfig(
        qkv=given.qkv or layouts.qkv, fc1=given.fc1 or layouts.fc1,
        source_tensor_parallel=given.source_tensor_parallel or layouts.source_tensor_parallel)


def merged_moe(cfg: ConvertConfig) -> tuple[MoeConfig, dict[str, int]]:
    """MoE flags over the --config YAML, and the YAML's MoE sizes (to cross-check)."""
    if cfg.config_yaml is None:
        return cfg.moe, {}
    from ms2mg_converter.source.moeyaml import read_moe_yaml

    router, sizes = read_moe_yaml(cfg.config_yaml)
    return cfg.moe.merged_over(router), sizes


def _mla(view: SourceView, given: ModelOverrides) -> tuple[MlaDims, tuple[str, ...]]:
    if given.num_attention_heads is None:
        raise UsageError("the number of attention heads of a multi-latent attention model cannot be read from "
                         "the tensors: pass --num-attention-heads or --config MODEL.yaml.")
    return infer_mla(view, given, given.num_attention_heads)


def infer_architecture(view: SourceView, cfg: ConvertConfig) -> Architecture:
    """Resolve the full architecture from headers, flags and YAML; raise on any contradiction."""
    given, layouts = merged_inputs(cfg)
    mla = is_mla(view)
    if mla:  # MLA has no groups and no single head dim: a YAML's num_key_value_heads / kv_channels are moot
        view = without_dense_qkv(view)
        given = given.model_copy(update={"kv_channels": None, "num_query_groups": None})
    num_layers = _check_layers(view)
    qkv_shape = (0,) if mla else _require(view, QKV + ".weight", 0)
    _require(view, PROJ + ".weight", 0)
    for n in NORMS:
        _require(view, n + ".weight", 0)
    _require(view, FINAL + ".weight")
    emb = _require(view, EMBED)
    h = emb[1] if len(emb) == 2 else 0
    mla_dims, mla_defaulted = _mla(view, given) if mla else (None, ())
    heads, groups, d = ((mla_dims.heads, mla_dims.heads, mla_dims.v_head_dim) if mla_dims is not None
                        else _heads(view, given, h, qkv_shape[0]))
    moe = infer_moe(view, h, *merged_moe(cfg))
    ffn, swiglu = _mlp(view, h, moe)
    if heads % groups:
        raise UsageError(f"num_attention_heads ({heads}) is not divisible by num_query_groups ({groups}).")
    _check_split(cfg, ModelOverrides(num_layers=num_layers, num_attention_heads=heads, num_query_groups=groups,
                                     ffn_hidden_size=ffn), emb[0] if emb else 0)
    rows, true, padded = _vocab(view, cfg, h)
    bias_linear, qkv_bias = _biases(view)
    pos = _shape(view, POS)
    rope = pos is None
    facts = resolve_facts(given, view.family.facts, rope, pos[0] if pos else None)
    arch = Architecture(
        family=view.family.name, num_layers=num_layers, hidden_size=h, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=groups, kv_channels=d, swiglu=swiglu,
        add_bias_linear=bias_linear, add_qkv_bias=qkv_bias,
        qk_layernorm=(view.get(QK_NORMS[0] + ".weight", 0) is not None if mla_dims is None
                      else mla_qk_layernorm(view, mla_dims)),
        untie_embeddings_and_output_weights=view.get(OUTPUT) is not None,
        normalization=_normalization(view),
        position_embedding_type=PositionEmbedding.ROPE if rope else PositionEmbedding.LEARNED_ABSOLUTE,
        source_vocab_rows=rows, true_vocab_size=true, padded_vocab_size=padded,
        **(facts.model_dump() | {"defaulted": tuple(sorted((*facts.defaulted, *mla_defaulted,
                                                             *(moe.defaulted if moe else ()))))}),
        qkv_layout=None, fc1_layout=None, moe=moe, mla=mla_dims)
    _cross_check(given, arch)
    _layer_shapes(view, arch)
    if pos is not None:
        _expect(POS, pos, (pos[0], h), "positions x hidden")
    qkv_layout, fc1_layout, source_tp = resolve_layouts(view, layouts, arch)
    return arch.model_copy(update={"qkv_layout": qkv_layout, "fc1_layout": fc1_layout,
                                   "source_tensor_parallel": source_tp})
