"""Property-based tests (hypothesis) of the code that meets untrusted input first.

* safetensors headers (`source.read_file`): random valid files parse to exactly the offsets, dtypes and
  shapes written, as the `safetensors` library reads them; random damage (truncation, flipped bytes in the
  length or the JSON, out-of-range or overlapping offsets, wrong JSON types, gaps, trailing bytes) either
  still parses to a consistent file or raises `SourceError` - never another exception - and whatever is
  accepted, the `safetensors` library (which `ms2mg verify` uses) accepts too.
* the plan (`plan.build_plan`, from headers only): random architectures, TP and PP either plan correctly -
  every tensor's rank shards put back together (rows or columns, or identical replicas) give the full
  Megatron shape, per-rank bytes add up, every row read lies inside its source tensor, layers are spread
  over the stages - or fail with the `ParallelismError` that names the numbers, exactly when a
  divisibility rule is broken (an independent oracle).

Round trips of the layout operations themselves are in tests/converter/test_ops.py (row maps against
torch, every inverse, TP split/merge).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import struct
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from ms2mg_converter.config import (
    ConvertConfig,
    Fc1Layout,
    LayoutConfig,
    ModelOverrides,
    QkvLayout,
    TransformerImpl,
    VocabConfig,
)
from ms2mg_converter.demo.sample import SampleSpec, logical_weights, mindformers_tensors
from ms2mg_converter.errors import ParallelismError, SourceError
from ms2mg_converter.layout import covered
from ms2mg_converter.plan import TensorEntry, build_plan
from ms2mg_converter.source.index import DTYPE_SIZES, SourceFile, SourceIndex, TensorInfo, read_file

_DIR = Path(tempfile.mkdtemp(prefix="ms2mg-properties-"))
atexit.register(shutil.rmtree, _DIR, True)
EXAMPLES = int(os.environ.get("MS2MG_PROPERTY_EXAMPLES", "300"))
"""Examples per property (raise it for a longer search: MS2MG_PROPERTY_EXAMPLES=5000)."""
_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------------------
# safetensors headers
# ---------------------------------------------------------------------------------------------------------

NAMES = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12).filter(
    lambda s: s != "__metadata__")


@st.composite
def valid_files(draw: st.DrawFn) -> tuple[bytes, dict[str, tuple[str, list[int], int, int]]]:
    """A valid safetensors file (tensors in random data order, optional metadata and header padding),
    and what it holds: name -> (dtype, shape, begin, end) relative to the data section."""
    names = draw(st.lists(NAMES, max_size=6, unique=True))
    specs = [(n, draw(st.sampled_from(sorted(DTYPE_SIZES))), draw(st.lists(st.integers(0, 5), max_size=3)))
             for n in names]
    order = draw(st.permutations(range(len(specs))))
    pos, where = 0, {}
    for i in order:
        name, dtype, shape = specs[i]
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        where[name] = (dtype, shape, pos, pos + nbytes)
        pos += nbytes
    header: dict[str, Any] = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
    for name, dtype, shape in specs:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": list(where[name][2:])}
    raw = json.dumps(header, ensure_ascii=draw(st.booleans())).encode() + b" " * draw(st.integers(0, 7))
    data = bytes(draw(st.integers(0, 255)) for _ in range(min(pos, 8))) + b"\x5a" * max(0, pos - 8)
    return struct.pack("<Q", len(raw)) + raw + data, where


def _write(content: bytes) -> Path:
    path = _DIR / "x.safetensors"
    path.write_bytes(content)
    return path


def _library_view(path: Path) -> dict[str, list[int]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict


@_SETTINGS
@given(valid_files())
def test_valid_headers_parse_to_the_written_offsets(file: tuple[bytes, dict[str, Any]]) -> None:
    content, where = file
    path = _write(content)
    sf, infos = read_file(path)
    (n,) = struct.unpack("<Q", content[:8])
    assert (sf.size, sf.header_bytes) == (len(content), n)
    got = {t.name: (t.dtype, list(t.shape), t.offset - 8 - n, t.offset - 8 - n + t.nbytes) for t in infos}
    assert got == {k: tuple(v) for k, v in where.items()}
    assert _library_view(path) == {k: v[1] for k, v in where.items()}


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=5)


@st.composite
def damaged_files(draw: st.DrawFn) -> bytes:
    content, _ = draw(valid_files())
    (n,) = struct.unpack("<Q", content[:8])
    header = json.loads(content[8:8 + n])
    data = content[8 + n:]
    kind = draw(st.sampled_from(["truncate", "flip", "length", "field", "offsets", "metadata", "duplicate",
                                 "append", "insert", "deep"]))
    event(f"damage: {kind}")
    if kind == "truncate":
        return content[: draw(st.integers(0, max(0, len(content) - 1)))]
    if kind == "flip":
        b = bytearray(content)
        i = draw(st.integers(0, 8 + n - 1))
        b[i] ^= draw(st.integers(1, 255))
        return bytes(b)
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + content[8:]
    if kind == "append":
        return content + draw(st.binary(min_size=1, max_size=16))
    if kind == "insert":
        i = draw(st.integers(8 + n, len(content)))
        return content[:i] + draw(st.binary(min_size=1, max_size=16)) + content[i:]
    if kind == "deep":
        raw = b"[" * 100000 + b"]" * 100000
        return struct.pack("<Q", len(raw)) + raw
    names = [k for k in header if k != "__metadata__"]
    if kind == "metadata":
        header["__metadata__"] = draw(JSON_VALUES)
    elif not names:
        return content
    elif kind == "field":
        header[draw(st.sampled_from(names))][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = \
            draw(JSON_VALUES | st.lists(st.integers(-3, 2**66), max_size=3))
    elif kind == "offsets":
        header[draw(st.sampled_from(names))]["data_offsets"] = [draw(st.integers(-5, len(data) + 5)),
                                                               draw(st.integers(-5, len(data) + 5))]
    elif kind == "duplicate":
        name = draw(st.sampled_from(names))
        text = json.dumps(header)
        raw = (text[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}").encode()
        return struct.pack("<Q", len(raw)) + raw + data
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@_SETTINGS
@given(damaged_files())
def test_damaged_headers_parse_consistently_or_raise_source_error(content: bytes) -> None:
    path = _write(content)
    try:
        sf, infos = read_file(path)
    except SourceError as e:
        message = str(e)
        assert str(path) in message
        event("refused with SourceError")
        return
    event("still a valid file")
    data_start = 8 + sf.header_bytes
    spans = sorted((t.offset, t.offset + t.nbytes) for t in infos)
    assert all(data_start <= a <= b <= sf.size for a, b in spans)
    assert sum(t.nbytes for t in infos) == sf.size - data_start  # the tensors tile the data section
    assert all(t.nbytes == math.prod(t.shape) * DTYPE_SIZES[t.dtype] for t in infos)
    # what ms2mg accepts, the safetensors library (used by `ms2mg verify`) accepts too
    assert _library_view(path) == {t.name: list(t.shape) for t in infos}


# ---------------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------------

@st.composite
def models(draw: st.DrawFn) -> dict[str, Any]:
    groups = draw(st.integers(1, 4))
    legacy = draw(st.booleans())
    m: dict[str, Any] = {
        "num_layers": draw(st.integers(1, 6)), "num_query_groups": groups,
        "num_attention_heads": groups * draw(st.integers(1, 4)), "kv_channels": draw(st.integers(1, 6)),
        "hidden_size": draw(st.integers(1, 24)), "ffn_hidden_size": draw(st.integers(1, 24)),
        "vocab_size": draw(st.integers(1, 300)), "swiglu": draw(st.booleans()),
        "bias": draw(st.sampled_from(["none", "all", "qkv"])), "tied": draw(st.booleans()),
        "normalization": draw(st.sampled_from(["RMSNorm", "LayerNorm"])),
        "names": "legacy" if legacy else "mcore",
        "qk_layernorm": False if legacy else draw(st.booleans()),
        "position_embedding_type": "rope" if legacy else draw(st.sampled_from(["rope", "learned_absolute"])),
        "max_position_embeddings": 16,
    }
    if not legacy:
        m["qkv_layout"] = draw(st.sampled_from(["grouped", "contiguous"]))
        m["fc1_layout"] = draw(st.sampled_from(["gate-up", "interleaved"]))
    return m


def _index(spec: SampleSpec) -> SourceIndex:
    tensors = mindformers_tensors(spec, logical_weights(spec))
    infos, pos = {}, 0
    fake = Path("/nonexistent/model.safetensors")
    for name, t in tensors.items():
        nbytes = t.numel() * 4
        infos[name] = TensorInfo(name, "F32", tuple(t.shape), fake, 8 + pos, nbytes)
        pos += nbytes
    return SourceIndex((SourceFile(fake, pos + 8, 0),), infos)


def _expected(key: str, m: dict[str, Any], padded: int) -> tuple[tuple[int, ...], str]:
    """Full Megatron shape of an output key and how TP splits it: rows, cols or rep (replicated)."""
    h, f, d = m["hidden_size"], m["ffn_hidden_size"], m["kv_channels"]
    nh, ng = m["num_attention_heads"], m["num_query_groups"]
    qkv, fc1 = (nh + 2 * ng) * d, (2 if m["swiglu"] else 1) * f
    suffix = key.split(".", 3)[3] if key.startswith("decoder.layers.") else key
    table: dict[str, tuple[tuple[int, ...], str]] = {
        "embedding.word_embeddings.weight": ((padded, h), "rows"),
        "output_layer.weight": ((padded, h), "rows"),
        "embedding.position_embeddings.weight": ((m["max_position_embeddings"], h), "rep"),
        "self_attention.linear_qkv.weight": ((qkv, h), "rows"),
        "self_attention.linear_qkv.bias": ((qkv,), "rows"),
        "self_attention.linear_proj.weight": ((h, nh * d), "cols"),
        "mlp.linear_fc1.weight": ((fc1, h), "rows"),
        "mlp.linear_fc1.bias": ((fc1,), "rows"),
        "mlp.linear_fc2.weight": ((h, f), "cols"),
    }
    if suffix in table:
        return table[suffix]
    assert suffix.rsplit(".", 1)[-1] in ("weight", "bias", "layer_norm_weight", "layer_norm_bias"), key
    return ((d,) if "q_layernorm" in suffix or "k_layernorm" in suffix else (h,)), "rep"


def _divisibility_problems(m: dict[str, Any], tp: int, pp: int, true_vocab: int | None) -> list[str]:
    """The independent oracle: the numbers that must divide."""
    layers, f = m["num_layers"], m["ffn_hidden_size"]
    bad = []
    if layers % pp or layers < pp:
        bad.append(f"({layers})")
    bad += [f"({v})" for v in (m["num_attention_heads"], m["num_query_groups"], f) if v % tp]
    if true_vocab is None and m["vocab_size"] % tp:
        bad.append(f"{m['vocab_size']} rows")  # only --true-vocab-size lets the table be padded
    return bad


@_SETTINGS
@given(m=models(), tp=st.integers(1, 4), pp=st.integers(1, 4), impl=st.sampled_from(list(TransformerImpl)),
       vocab=st.data())
def test_plan_splits_correctly_or_names_the_divisibility_problem(m: dict[str, Any], tp: int, pp: int,
                                                                 impl: TransformerImpl, vocab: st.DataObject) -> None:
    spec = SampleSpec(**m)
    true_vocab = vocab.draw(st.none() | st.integers(1, m["vocab_size"]), label="true_vocab")
    divisible_by = vocab.draw(st.integers(1, 16), label="divisible_by")
    cfg = ConvertConfig(
        load_dir=Path("/nonexistent"), tensor_parallel=tp, pipeline_parallel=pp, transformer_impl=impl,
        model=ModelOverrides(num_attention_heads=m["num_attention_heads"], num_query_groups=m["num_query_groups"],
                             kv_channels=m["kv_channels"]),
        layouts=LayoutConfig(qkv=QkvLayout(m.get("qkv_layout", "grouped")),
                             fc1=Fc1Layout(m.get("fc1_layout", "gate-up")), source_tensor_parallel=1),
        vocab=VocabConfig(true_vocab_size=true_vocab, make_vocab_size_divisible_by=divisible_by))
    expected_problems = _divisibility_problems(m, tp, pp, true_vocab)
    event("ParallelismError expected" if expected_problems else "plan expected")
    if expected_problems:
        with pytest.raises(ParallelismError) as e:
            build_plan(cfg, _index(spec))
        msg = str(e.value)
        assert f"TP {tp}" in msg or f"TP={tp}" in msg
        for number in expected_problems:
            assert number in msg, (number, msg)
        return
    plan = build_plan(cfg, _index(spec))
    padded = m["vocab_size"] if true_vocab is None else -(-true_vocab // (divisible_by * tp)) * divisible_by * tp
    assert plan.arch.padded_vocab_size == padded
    assert len(plan.files) == tp * pp == len({f.path for f in plan.files})
    per_stage = m["num_layers"] // pp
    shards: dict[str, dict[int, tuple[int, ...]]] = defaultdict(dict)
    for fp in plan.files:
        layers_here = set()
        for e in fp.entries():
            if not isinstance(e, TensorEntry):
                continue
            key = e.key
            if key.startswith("decoder.layers."):
                local = int(key.split(".")[2])
                assert local < per_stage
                layers_here.add(local)
                key = key.replace(f"layers.{local}.", f"layers.{fp.pp_rank * per_stage + local}.", 1)
            assert fp.tp_rank not in shards[key], key
            shards[key][fp.tp_rank] = e.shape
            assert e.nbytes == math.prod(e.shape) * 2  # bf16
            assert covered(list(e.runs)) == e.shape[0]
            for run in e.runs:  # every row read lies inside its source tensor
                if run.src is not None:
                    assert run.start >= 0 and run.start + (run.count - 1) * run.step < e.inputs[run.src].rows
            if e.cols is not None:
                assert 0 <= e.cols[0] < e.cols[1] <= e.inputs[0].cols
        assert layers_here == set(range(per_stage))
        assert fp.tensor_bytes == sum(e.nbytes for e in fp.entries() if isinstance(e, TensorEntry))
    expected_bytes = 0
    for key, by_rank in shards.items():
        full, how = _expected(key, m, padded)
        assert sorted(by_rank) == list(range(tp)), key
        parts = [by_rank[r] for r in range(tp)]
        if how == "rep":
            merged = parts[0]
            assert all(p == merged for p in parts)
        elif how == "rows":
            assert all(p[1:] == parts[0][1:] for p in parts)
            merged = (sum(p[0] for p in parts), *parts[0][1:])
        else:
            assert all(p[0] == parts[0][0] for p in parts)
            merged = (parts[0][0], sum(p[1] for p in parts))
        assert merged == full, (key, parts, full)
        expected_bytes += math.prod(full) * 2 * (tp if how == "rep" else 1)
    # untied: the output layer; tied with PP > 1: the last stage's copy of its embedding shard (as Megatron)
    assert ("output_layer.weight" in shards) == (not m["tied"] or pp > 1)
    assert plan.tensor_bytes == expected_bytes
