"""The bad-input corpus: every way a conversion can be refused, built by code (no committed binaries).

A `Case` builds its source (and, where it matters, its destination) under a fresh directory, says which
flags to pass, and states the outcome a user must see: the exit code and reason of README.md's table,
and the words (file, tensor or flag) the one-paragraph error must contain. `run_case` runs
`python -m ms2mg_converter convert` as a real process - as an unprivileged user, under a signal, on a
read-only or full file system where the case asks - and records what happened, including anything left
at the destination. `tests/reliability/test_bad_input.py` asserts the outcomes;
`python -m tests.reliability.corpus` prints the table of docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ms2mg_converter.demo.sample import SampleSpec, logical_weights, mindformers_tensors
from tests.reliability.corpus_distributed import distributed_cases

NOBODY = 65534
FILE = "model.safetensors"
L0 = "decoder.layers.0."


class Unsupported(Exception):
    """The machine cannot stage this case (no mount privilege, no setpriv, ...): the test is skipped."""


def _sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        raise Unsupported(f"{' '.join(cmd)} failed: {r.stderr.strip()}")


def flags_for(spec: SampleSpec) -> list[str]:
    """What a user passes for a sample: heads, groups, layouts."""
    return ["--num-attention-heads", str(spec.num_attention_heads), "--num-query-groups",
            str(spec.num_query_groups), "--qkv-layout", spec.qkv_layout, "--fc1-layout", spec.fc1_layout,
            "--source-tensor-parallel-size", "1"]


def split_file(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header (JSON) and data section."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_file(path: Path, header: dict[str, Any] | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def by_offset(header: dict[str, Any]) -> list[str]:
    """Tensor names in data order."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


class Ctx:
    """One case's world: a world-writable (sticky) directory, its source, destination and cleanups."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.src = root / "src"
        self.src.mkdir()
        self.load: Path = self.src
        self.dst = root / "out"
        self.result = root / "result.json"
        self.spec = SampleSpec()
        self.cleanups: list[Callable[[], None]] = []

    # -- sources -------------------------------------------------------------------------------------
    def tensors(self, spec: SampleSpec | None = None) -> dict[str, torch.Tensor]:
        if spec is not None:
            self.spec = spec
        return mindformers_tensors(self.spec, logical_weights(self.spec))

    def save(self, tensors: dict[str, torch.Tensor], name: str = FILE) -> Path:
        path = self.src / name
        save_file(tensors, str(path), metadata={"format": "pt"})
        path.chmod(0o644)  # safetensors creates files 0600; the unprivileged cases must read them
        return path

    def sample(self, spec: SampleSpec | None = None, **kw: Any) -> list[str]:
        """Write a valid sample (one file); returns the flags it needs."""
        self.save(self.tensors(spec or SampleSpec(**kw)))
        return flags_for(self.spec)

    def shards(self, tensors: dict[str, torch.Tensor], n: int = 2) -> list[Path]:
        keys = list(tensors)
        paths = []
        for j in range(n):
            part = {k: tensors[k] for k in keys[j * len(keys) // n:(j + 1) * len(keys) // n]}
            paths.append(self.save(part, f"model-{j + 1:05d}-of-{n:05d}.safetensors"))
        return paths

    # -- the machine ---------------------------------------------------------------------------------
    def mount_tmpfs(self, path: Path, size: int, readonly: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        _sh("mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", str(path))
        self.cleanups.append(lambda: _sh("umount", str(path)))
        if readonly:
            _sh("mount", "-o", "remount,ro", str(path))
        return path

    def immutable(self, path: Path) -> None:
        _sh("chattr", "+i", str(path))
        self.cleanups.append(lambda: _sh("chattr", "-i", str(path)))

    def close(self) -> None:
        for fn in reversed(self.cleanups):
            with contextlib.suppress(Unsupported):
                fn()
        self.cleanups.clear()


Build = Callable[[Ctx], list[str]]


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    """What is wrong, in words (the docs table)."""
    build: Build
    exit_code: int
    reason: str
    mentions: tuple[str, ...]
    """Words the error message must contain: the file, tensor or flag at fault."""
    user: int | None = None
    """Run the converter as this uid/gid (DAC permissions do not apply to root)."""
    signal: int | None = None
    """Send this signal once the first tensor group is written."""
    inject: str = ""
    """Python run in the converter process before `main` (fault injection)."""


@dataclass
class Outcome:
    case: str
    exit_code: int
    stderr: str
    result: dict[str, Any] | None
    error_lines: list[str]
    leftovers: list[str]
    destination_changed: bool
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def message(self) -> str:
        return self.result.get("message", "") if self.result else ""


# ---------------------------------------------------------------------------------------------------------
# Case builders
# ---------------------------------------------------------------------------------------------------------

def _edit_file(edit: Callable[[dict[str, Any], bytes, Path], tuple[dict[str, Any] | bytes, bytes]]) -> Build:
    """A valid sample whose single file is rewritten by `edit(header, data, path)`."""

    def build(ctx: Ctx) -> list[str]:
        flags = ctx.sample()
        path = ctx.src / FILE
        header, data = split_file(path)
        new_header, new_data = edit(header, data, path)
        join_file(path, new_header, new_data)
        return flags

    return build


def _raw_file(edit: Callable[[bytes], bytes]) -> Build:
    def build(ctx: Ctx) -> list[str]:
        flags = ctx.sample()
        path = ctx.src / FILE
        path.write_bytes(edit(path.read_bytes()))
        return flags

    return build


def _tensors(edit: Callable[[dict[str, torch.Tensor]], object], extra: tuple[str, ...] = (),
             spec: SampleSpec | None = None) -> Build:
    """A sample whose tensors are edited in memory before they are written (a valid safetensors file)."""

    def build(ctx: Ctx) -> list[str]:
        t = ctx.tensors(spec or SampleSpec())
        edit(t)
        ctx.save(t)
        return [*flags_for(ctx.spec), *extra]

    return build


def _flags(*extra: str, spec: SampleSpec | None = None) -> Build:
    def build(ctx: Ctx) -> list[str]:
        return [*ctx.sample(spec), *extra]

    return build


def _header_len(raw: bytes) -> int:
    return int(struct.unpack("<Q", raw[:8])[0])


def truncated_data(raw: bytes) -> bytes:
    return raw[: 8 + _header_len(raw) + (len(raw) - 8 - _header_len(raw)) * 6 // 10]


def truncated_header(raw: bytes) -> bytes:
    return raw[: 8 + _header_len(raw) // 2]


def flip_json(raw: bytes) -> bytes:
    n = _header_len(raw)
    b = bytearray(raw)
    b[8 + n // 2: 8 + n // 2 + 4] = b"\x00}\x7f]"
    return bytes(b)


def not_utf8(raw: bytes) -> bytes:
    n = _header_len(raw)
    b = bytearray(raw)
    b[8 + n // 3] = 0xFF
    return bytes(b)


def shift_last_past_end(h: dict[str, Any], data: bytes, path: Path) -> tuple[dict[str, Any], bytes]:
    last = h[by_offset(h)[-1]]
    b, e = last["data_offsets"]
    last["data_offsets"] = [b + 4096, e + 4096]
    return h, data


def short_span(h: dict[str, Any], data: bytes, path: Path) -> tuple[dict[str, Any], bytes]:
    h["decoder.final_layernorm.weight"]["shape"] = [128]
    return h, data


def overlap(h: dict[str, Any], data: bytes, path: Path) -> tuple[dict[str, Any], bytes]:
    """layer 0's pre_mlp_layernorm points at the bytes of its input_layernorm (same size)."""
    h[L0 + "pre_mlp_layernorm.weight"]["data_offsets"] = list(h[L0 + "input_layernorm.weight"]["data_offsets"])
    return h, data


def gap(h: dict[str, Any], data: bytes, path: Path) -> tuple[dict[str, Any], bytes]:
    names = by_offset(h)
    b0 = h[names[-1]]["data_offsets"][0]
    for n in names[-1:]:
        b, e = h[n]["data_offsets"]
        h[n]["data_offsets"] = [b + 256, e + 256]
    return h, data[:b0] + b"\0" * 256 + data[b0:]


def trailing(h: dict[str, Any], data: bytes, path: Path) -> tuple[dict[str, Any], bytes]:
    return h, data + b"\0" * 1000


def dtype_to(name: str, dtype: str) -> Callable[[dict[str, Any], bytes, Path], tuple[dict[str, Any], bytes]]:
    def edit(h: dict[str, Any], data: bytes, path: Path) -> tuple[dict[str, Any], bytes]:
        h[name]["dtype"] = dtype
        return h, data

    return edit


def bool_shape(h: dict[str, Any], data: bytes, path: Path) -> tuple[bytes, bytes]:
    h["decoder.final_layernorm.weight"]["shape"] = ["SHAPE"]
    raw = json.dumps(h).replace('["SHAPE"]', "[64, true]").encode()
    return raw, data


def duplicate_in_header(h: dict[str, Any], data: bytes, path: Path) -> tuple[bytes, bytes]:
    """The same name twice in one header: JSON parsers silently keep one of them."""
    name = "decoder.layers.0.mlp.linear_fc2.weight"
    entry = json.dumps(h[name])
    raw = json.dumps(h)
    raw = raw[:-1] + f', "{name}": {entry}' + "}"
    return raw.encode(), data


def torch_pickle(raw: bytes) -> bytes:
    """A torch/MindSpore-style pickle archive instead of safetensors (the wrong file given)."""
    import io

    buf = io.BytesIO()
    torch.save({"embedding.word_embeddings.weight": torch.zeros(10, 4)}, buf)
    return buf.getvalue()


def drop(*keys: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        for k in keys:
            del t[k]

    return edit


def drop_layer(layer: int) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        for k in [k for k in t if k.startswith(f"decoder.layers.{layer}.")]:
            del t[k]

    return edit


def add(name: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[name] = value

    return edit


def poke(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[name].view(-1)[7] = value

    return edit


def duplicated_across_shards(ctx: Ctx) -> list[str]:
    t = ctx.tensors(SampleSpec())
    keys = list(t)
    first, second = {k: t[k] for k in keys[: len(keys) // 2]}, {k: t[k] for k in keys[len(keys) // 2:]}
    first["decoder.final_layernorm.weight"] = t["decoder.final_layernorm.weight"]  # also in the second shard
    ctx.save(first, "model-00001-of-00002.safetensors")
    ctx.save(second, "model-00002-of-00002.safetensors")
    return flags_for(ctx.spec)


def without_flags(*names: str) -> Build:
    """A valid sample, run without the given flags (and their values)."""

    def build(ctx: Ctx) -> list[str]:
        flags = ctx.sample()
        out = []
        it = iter(flags)
        for f in it:
            value = next(it)
            if f not in names:
                out += [f, value]
        return out

    return build


def _index(ctx: Ctx, weight_map: dict[str, str] | None, text: str | None = None) -> None:
    path = ctx.src / "model.safetensors.index.json"
    path.write_text(text if text is not None else json.dumps({"metadata": {}, "weight_map": weight_map}))


def index_missing_shard(ctx: Ctx) -> list[str]:
    t = ctx.tensors(SampleSpec())
    paths = ctx.shards(t, 3)
    weight_map = {}
    for p in paths:
        weight_map.update(dict.fromkeys(split_file(p)[0].keys() - {"__metadata__"}, p.name))
    _index(ctx, weight_map)
    paths[1].unlink()
    return flags_for(ctx.spec)


def index_mismatch(ctx: Ctx) -> list[str]:
    t = ctx.tensors(SampleSpec())
    paths = ctx.shards(t, 2)
    weight_map = {}
    for p in paths:
        weight_map.update(dict.fromkeys(split_file(p)[0].keys() - {"__metadata__"}, p.name))
    weight_map["output_layer.weight"] = paths[0].name if weight_map["output_layer.weight"] != paths[0].name \
        else paths[1].name
    _index(ctx, weight_map)
    return flags_for(ctx.spec)


def index_not_json(ctx: Ctx) -> list[str]:
    flags = ctx.sample()
    _index(ctx, None, text='{"weight_map": {"a": ')
    return flags


def index_values_not_names(ctx: Ctx) -> list[str]:
    flags = ctx.sample()
    _index(ctx, {"embedding.word_embeddings.weight": 1})
    return flags


def index_outside(ctx: Ctx) -> list[str]:
    """The index points at a shard outside --load-dir (it must not be read)."""
    t = ctx.tensors(SampleSpec())
    elsewhere = ctx.root / "elsewhere"
    elsewhere.mkdir()
    save_file(t, str(elsewhere / FILE))
    _index(ctx, dict.fromkeys(t, "../elsewhere/" + FILE))
    return flags_for(ctx.spec)


def empty_directory(ctx: Ctx) -> list[str]:
    return flags_for(ctx.spec)


def load_dir_missing(ctx: Ctx) -> list[str]:
    ctx.load = ctx.root / "no-such-checkpoint"
    return flags_for(ctx.spec)


def unreadable_file(ctx: Ctx) -> list[str]:
    t = ctx.tensors(SampleSpec())
    paths = ctx.shards(t, 2)
    paths[1].chmod(0o600)  # owned by root: the unprivileged converter cannot read it
    return flags_for(ctx.spec)


def unreadable_directory(ctx: Ctx) -> list[str]:
    flags = ctx.sample()
    ctx.src.chmod(0o700)
    return flags


def save_is_load(ctx: Ctx) -> list[str]:
    flags = ctx.sample()
    ctx.dst = ctx.src
    return flags


def save_above_load(ctx: Ctx) -> list[str]:
    inner = ctx.root / "ckpt" / "mf"
    inner.mkdir(parents=True)
    ctx.src.rmdir()
    ctx.src = inner
    ctx.load = inner
    flags = ctx.sample()
    ctx.dst = ctx.root / "ckpt"
    return flags


def destination_not_empty(ctx: Ctx) -> list[str]:
    ctx.dst.mkdir()
    (ctx.dst / "notes.txt").write_text("my notes\n")
    return ctx.sample()


def overwrite_foreign(ctx: Ctx) -> list[str]:
    ctx.dst.mkdir()
    (ctx.dst / "iter_0000001").mkdir()
    (ctx.dst / "iter_0000001" / "other.pt").write_bytes(b"not from ms2mg")
    return [*ctx.sample(), "--overwrite"]


def destination_is_file(ctx: Ctx) -> list[str]:
    ctx.dst.write_text("a file\n")
    return ctx.sample()


def read_only_fs(ctx: Ctx) -> list[str]:
    flags = ctx.sample()
    ctx.dst = ctx.mount_tmpfs(ctx.root / "ro", 1 << 20, readonly=True) / "out"
    return flags


def read_only_fs_deep(ctx: Ctx) -> list[str]:
    flags = ctx.sample()
    ctx.dst = ctx.mount_tmpfs(ctx.root / "ro", 1 << 20, readonly=True) / "models" / "llama" / "out"
    return flags


def immutable_parent(ctx: Ctx) -> list[str]:
    flags = ctx.sample()
    parent = ctx.root / "frozen"
    parent.mkdir()
    ctx.immutable(parent)
    ctx.dst = parent / "out"
    return flags


def parent_not_writable(ctx: Ctx) -> list[str]:
    flags = ctx.sample()
    parent = ctx.root / "root-owned"
    parent.mkdir(mode=0o755)
    parent.chmod(0o755)
    ctx.dst = parent / "out"
    return flags


def disk_full(ctx: Ctx) -> list[str]:
    flags = ctx.sample()
    ctx.dst = ctx.mount_tmpfs(ctx.root / "small", 256 * 1024) / "out"
    return flags


def disk_full_at_manifest(ctx: Ctx) -> list[str]:
    """Room for the rank file and the tracker, not for the manifest: ENOSPC after verification."""
    flags = ctx.sample()
    probe = ctx.root / "probe"
    r = subprocess.run([sys.executable, "-m", "ms2mg_converter", "convert", "--load-dir", str(ctx.load),
                        "--save-dir", str(probe), "--progress", "none", "--no-verify", *flags],
                       capture_output=True, text=True, check=False)
    if r.returncode:
        raise Unsupported(f"probe conversion failed: {r.stderr}")
    pages = sum(-(-p.stat().st_size // 4096) for p in probe.rglob("*")
                if p.is_file() and p.name != "ms2mg-manifest.json")
    shutil.rmtree(probe)
    ctx.dst = ctx.mount_tmpfs(ctx.root / "tight", pages * 4096) / "out"
    return flags


ENOSPC_ON_FSYNC = """
import errno, os
def _fsync(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
os.fsync = _fsync
"""


def medium(ctx: Ctx) -> list[str]:
    """A sample big enough (about 20 MB of output) that a signal lands mid-conversion."""
    spec = SampleSpec(num_layers=8, hidden_size=256, ffn_hidden_size=1024, vocab_size=4000)
    return [*ctx.sample(spec), "--tp", "2"]


GQA2 = SampleSpec(num_attention_heads=8, num_query_groups=2)


CASES: tuple[Case, ...] = (
    # -- the file is not a valid safetensors file ------------------------------------------------------
    Case("truncated-data", "file cut at 60 % of its data (interrupted copy)", _raw_file(truncated_data),
         3, "InvalidSource", (FILE, "data bytes")),
    Case("truncated-header", "file cut inside its JSON header", _raw_file(truncated_header),
         3, "InvalidSource", (FILE, "header claims")),
    Case("shorter-than-length", "file of 5 bytes", _raw_file(lambda raw: raw[:5]),
         3, "InvalidSource", (FILE, "shorter than the 8-byte")),
    Case("oversized-header", "header length field 2^40", _raw_file(lambda raw: struct.pack("<Q", 1 << 40) + raw[8:]),
         3, "InvalidSource", (FILE, "header claims")),
    Case("header-not-json", "bytes inside the JSON header overwritten", _raw_file(flip_json),
         3, "InvalidSource", (FILE, "does not parse")),
    Case("header-not-utf8", "a 0xFF byte inside the JSON header", _raw_file(not_utf8),
         3, "InvalidSource", (FILE, "does not parse")),
    Case("header-not-object", "the header is a JSON array", _edit_file(lambda h, d, p: (b"[1, 2]", d)),
         3, "InvalidSource", (FILE, "not a JSON object")),
    Case("offsets-past-end", "last tensor's data_offsets point past the end of the file",
         _edit_file(shift_last_past_end), 3, "InvalidSource", (FILE, "output_layer.weight", "data bytes")),
    Case("offsets-size-mismatch", "shape needs more bytes than data_offsets span", _edit_file(short_span),
         3, "InvalidSource", (FILE, "decoder.final_layernorm.weight", "needs")),
    Case("overlapping-offsets", "two tensors share the same bytes", _edit_file(overlap),
         3, "InvalidSource", (FILE, "overlap")),
    Case("gap-in-data", "256 unused bytes between two tensors (the safetensors library refuses this)",
         _edit_file(gap), 3, "InvalidSource", (FILE, "output_layer.weight")),
    Case("trailing-bytes", "1000 bytes after the last tensor (the safetensors library refuses this)",
         _edit_file(trailing), 3, "InvalidSource", (FILE, "1000")),
    Case("unknown-dtype", "a dtype name safetensors does not define", _edit_file(dtype_to(L0 + "mlp.linear_fc2.weight",
                                                                                        "F12")),
         3, "InvalidSource", (FILE, L0 + "mlp.linear_fc2.weight", "F12")),
    Case("integer-weight", "a weight stored as I32", _edit_file(dtype_to(L0 + "mlp.linear_fc2.weight", "I32")),
         3, "InvalidSource", (FILE, L0 + "mlp.linear_fc2.weight", "I32")),
    Case("boolean-in-shape", "a JSON `true` inside a shape", _edit_file(bool_shape),
         3, "InvalidSource", (FILE, "decoder.final_layernorm.weight", "shape")),
    Case("duplicate-key-in-header", "one file's header names a tensor twice", _edit_file(duplicate_in_header),
         3, "InvalidSource", (FILE, L0 + "mlp.linear_fc2.weight", "twice")),
    Case("torch-pickle-given", "a torch.save archive renamed to .safetensors", _raw_file(torch_pickle),
         3, "InvalidSource", (FILE,)),
    # -- the files are fine, the checkpoint is not ------------------------------------------------------
    Case("missing-layer", "all tensors of layer 2 (of 4) absent", _tensors(drop_layer(2)),
         3, "MissingKey", ("layer(s) [2]",)),
    Case("missing-last-layer-tensor", "decoder.layers.3.mlp.linear_fc2.weight absent",
         _tensors(drop("decoder.layers.3.mlp.linear_fc2.weight")), 3, "MissingKey", ("decoder.layers.3.mlp.",)),
    Case("missing-embedding", "no word embedding", _tensors(drop("embedding.word_embeddings.weight")),
         3, "MissingKey", ("embedding.word_embeddings.weight",)),
    Case("missing-bias-declared", "--add-bias-linear given, the tensors have no biases",
         _flags("--add-bias-linear"), 3, "ShapeMismatch", ("--add-bias-linear",)),
    Case("missing-one-bias", "biases everywhere except layer 1's linear_proj",
         _tensors(drop("decoder.layers.1.self_attention.linear_proj.bias"), spec=SampleSpec(bias="all")),
         3, "MissingKey", ("layer 1", "linear_proj.bias")),
    Case("extra-unknown-key", "an adapter weight no mapping table knows",
         _tensors(add(L0 + "self_attention.linear_qkv.lora_a.weight", torch.zeros(4, 64))), 3, "UnknownKey",
         (L0 + "self_attention.linear_qkv.lora_a.weight", "--ignore-keys")),
    Case("router-beside-dense-mlp", "a MoE router in a layer that also holds a dense linear_fc1",
         _tensors(add(L0 + "mlp.router.weight", torch.zeros(4, 64))), 3, "ShapeMismatch",
         (L0 + "mlp.linear_fc1.weight", "MoE router")),
    Case("duplicate-key-across-shards", "decoder.final_layernorm.weight in both shards",
         duplicated_across_shards, 3, "InvalidSource",
         ("decoder.final_layernorm.weight", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")),
    Case("shape-contradicts-flag", "--hidden-size 128 for a hidden-64 model", _flags("--hidden-size", "128"),
         3, "ShapeMismatch", ("--hidden-size 128",)),
    Case("shape-contradicts-heads", "--num-query-groups 8 where the qkv rows imply 4",
         _flags("--num-query-groups", "8"), 3, "ShapeMismatch", ("linear_qkv.weight", "groups 8")),
    Case("layer-shape-differs", "layer 2's linear_fc2 has 96 instead of 128 columns",
         _tensors(add("decoder.layers.2.mlp.linear_fc2.weight", torch.zeros(64, 96))), 3, "ShapeMismatch",
         ("decoder.layers.2.mlp.linear_fc2.weight", "[64, 96]")),
    Case("index-missing-shard", "the index lists a shard that is not there", index_missing_shard,
         3, "InvalidSource", ("model.safetensors.index.json", "model-00002-of-00003.safetensors")),
    Case("index-mismatch", "the index puts output_layer.weight in the wrong shard", index_mismatch,
         3, "InvalidSource", ("model.safetensors.index.json", "output_layer.weight")),
    Case("index-not-json", "model.safetensors.index.json cut short", index_not_json,
         3, "InvalidSource", ("model.safetensors.index.json",)),
    Case("index-values-not-names", "the index maps a tensor to the number 1", index_values_not_names,
         3, "InvalidSource", ("model.safetensors.index.json", "weight_map")),
    Case("index-points-outside", "the index names ../elsewhere/model.safetensors", index_outside,
         3, "InvalidSource", ("model.safetensors.index.json", "../elsewhere/model.safetensors", "--load-dir")),
    Case("empty-directory", "--load-dir holds no file", empty_directory,
         3, "InvalidSource", ("--load-dir", "no *.safetensors")),
    Case("load-dir-missing", "--load-dir does not exist", load_dir_missing,
         3, "InvalidSource", ("--load-dir", "no-such-checkpoint")),
    Case("unreadable-file", "one shard is mode 0600, owned by another user", unreadable_file,
         3, "InvalidSource", ("model-00002-of-00002.safetensors", "ermission"), user=NOBODY),
    Case("unreadable-directory", "--load-dir is mode 0700, owned by another user", unreadable_directory,
         3, "InvalidSource", ("--load-dir", "ermission"), user=NOBODY),
    Case("nan-weight", "one NaN in layer 1's linear_fc2", _tensors(poke("decoder.layers.1.mlp.linear_fc2.weight",
                                                                        float("nan"))),
         3, "NonFiniteWeights", ("decoder.layers.1.mlp.linear_fc2.weight", "--allow-nonfinite")),
    Case("inf-weight", "one -Inf in the embedding", _tensors(poke("embedding.word_embeddings.weight", float("-inf"))),
         3, "NonFiniteWeights", ("embedding.word_embeddings.weight", "--allow-nonfinite")),
    Case("overflow-on-cast", "a finite 1e5 that becomes Inf in --dtype fp16",
         _tensors(poke("output_layer.weight", 1e5), ("--dtype", "fp16")), 3, "NonFiniteWeights",
         ("output_layer.weight", "fp16", "--allow-nonfinite")),
    # -- the flags cannot describe this model ---------------------------------------------------------
    Case("tp-not-divisible", "--tp 3 (8 heads, 4 groups, ffn 128, vocab 1000)", _flags("--tp", "3"),
         2, "ParallelismMismatch", ("TP=3", "(3)")),
    Case("pp-not-divisible", "--pp 3 with 4 layers", _flags("--pp", "3"),
         2, "ParallelismMismatch", ("PP=3", "num_layers (4)")),
    Case("groups-not-divisible-by-tp", "2 query groups, --tp 4", _flags("--tp", "4", spec=GQA2),
         2, "ParallelismMismatch", ("num_query_groups (2)", "(4)")),
    Case("heads-not-divisible-by-groups", "--num-query-groups 3 for 8 heads", _flags("--num-query-groups", "3"),
         2, "InvalidArguments", ("num_attention_heads (8)", "num_query_groups (3)")),
    Case("vocab-trim-larger-than-table", "--true-vocab-size 2000 for a 1000-row embedding",
         _flags("--true-vocab-size", "2000"), 2, "InvalidArguments", ("--true-vocab-size 2000", "1000 rows")),
    Case("vocab-rows-not-divisible-by-tp", "1001 embedding rows, --tp 2, no --true-vocab-size",
         _flags("--tp", "2", spec=SampleSpec(vocab_size=1001)), 2, "ParallelismMismatch",
         ("1001 rows", "--true-vocab-size")),
    Case("heads-missing", "no --num-attention-heads and no --config",
         without_flags("--num-attention-heads", "--num-query-groups"),
         2, "InvalidArguments", ("--num-attention-heads",)),
    Case("layout-missing", "a fused GQA linear_qkv without --qkv-layout", without_flags("--qkv-layout"),
         2, "InvalidArguments", ("--qkv-layout",)),
    Case("tp-zero", "--tp 0", _flags("--tp", "0"), 2, "InvalidArguments", ("tensor_parallel",)),
    Case("save-dir-is-load-dir", "--save-dir equal to --load-dir", save_is_load,
         2, "InvalidArguments", ("--save-dir", "--load-dir")),
    Case("save-dir-above-load-dir", "--save-dir is a parent of --load-dir", save_above_load,
         2, "InvalidArguments", ("--save-dir", "--load-dir")),
    Case("pp-uneven-sizes-exceed", "--pp 2 with first and last stage sizes 3 + 3 (4 layers)",
         _flags("--pp", "2", "--decoder-first-pipeline-num-layers", "3", "--decoder-last-pipeline-num-layers", "3"),
         2, "ParallelismMismatch", ("--decoder-first-pipeline-num-layers (3)", "--decoder-last-pipeline-num-layers (3)",
                                    "num_layers (4)")),
    Case("vpp-without-pp", "--num-virtual-stages-per-pipeline-rank 2 with PP 1",
         _flags("--num-virtual-stages-per-pipeline-rank", "2"), 2, "ParallelismMismatch",
         ("--num-virtual-stages-per-pipeline-rank", "--target-pipeline-parallel-size")),
    Case("vpp-layers-with-uneven-stages", "--num-layers-per-virtual-pipeline-stage with an uneven first stage",
         _flags("--pp", "2", "--decoder-first-pipeline-num-layers", "2",
                "--num-layers-per-virtual-pipeline-stage", "1"),
         2, "ParallelismMismatch",
         ("--num-layers-per-virtual-pipeline-stage", "--num-virtual-stages-per-pipeline-rank")),
    Case("vpp-not-dividing-stage", "--pp 2 with 3-layer virtual chunks (2 layers per stage)",
         _flags("--pp", "2", "--num-layers-per-virtual-pipeline-stage", "3"), 2, "ParallelismMismatch",
         ("--num-layers-per-virtual-pipeline-stage (3)", "2 layers per pipeline stage")),
    Case("pp-stage-size-zero", "--decoder-last-pipeline-num-layers 0",
         _flags("--pp", "2", "--decoder-last-pipeline-num-layers", "0"), 2, "InvalidArguments",
         ("--decoder-last-pipeline-num-layers",)),
    # -- the destination ------------------------------------------------------------------------------
    Case("destination-not-empty", "--save-dir holds a user's file", destination_not_empty,
         4, "DestinationExists", ("--save-dir", "not empty", "--overwrite")),
    Case("overwrite-foreign-directory", "--overwrite of a directory ms2mg did not write", overwrite_foreign,
         4, "DestinationExists", ("--save-dir", "ms2mg-manifest.json")),
    Case("destination-is-a-file", "--save-dir names a regular file", destination_is_file,
         4, "DestinationNotWritable", ("--save-dir", "not a directory")),
    Case("read-only-filesystem", "--save-dir on a tmpfs mounted read-only", read_only_fs,
         4, "DestinationNotWritable", ("--save-dir", "Read-only file system")),
    Case("read-only-filesystem-deep", "--save-dir three levels below a read-only mount", read_only_fs_deep,
         4, "DestinationNotWritable", ("--save-dir", "Read-only file system")),
    Case("immutable-parent", "the parent of --save-dir is chattr +i (refuses even root)", immutable_parent,
         4, "DestinationNotWritable", ("--save-dir", "Operation not permitted")),
    Case("parent-not-writable", "the parent of --save-dir is root's 0755 directory", parent_not_writable,
         4, "DestinationNotWritable", ("--save-dir", "Permission denied"), user=NOBODY),
    # -- the machine ---------------------------------------------------------------------------------
    Case("disk-full", "--save-dir on a 256 KiB tmpfs (the output needs 580 KB)", disk_full,
         6, "IOError", ("No space left on device", "--save-dir")),
    Case("disk-full-at-manifest", "a tmpfs with room for the rank file but not the manifest",
         disk_full_at_manifest, 6, "IOError", ("No space left on device", "--save-dir")),
    Case("enospc-on-fsync", "fsync fails with ENOSPC (faked: delayed allocation on a full volume)",
         _flags(), 6, "IOError", ("No space left on device", "--save-dir"), inject=ENOSPC_ON_FSYNC),
    Case("sigterm-mid-write", "SIGTERM after the first tensor group (20 MB TP2 conversion)", medium,
         130, "Interrupted", ("SIGTERM",), signal=signal.SIGTERM),
    Case("sigint-mid-write", "SIGINT (Ctrl-C) after the first tensor group", medium,
         130, "Interrupted", ("SIGINT",), signal=signal.SIGINT),
)
CASES += distributed_cases(Case)  # rank_N/ + strategy sources (tests/reliability/corpus_distributed.py)


# ---------------------------------------------------------------------------------------------------------
# Running a case
# ---------------------------------------------------------------------------------------------------------

def _snapshot(path: Path) -> dict[str, str] | None:
    if not path.exists():
        return None
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


@contextlib.contextmanager
def world_dir(prefix: str = "ms2mg-reliability-") -> Iterator[Path]:
    """A temporary directory that an unprivileged user can enter and write (sticky, like /tmp)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o1777)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def command_for(case: Case, ctx: Ctx, flags: list[str]) -> list[str]:
    progress = "json" if case.signal else "none"
    args = ["convert", "--load-dir", str(ctx.load), "--save-dir", str(ctx.dst), "--result-file", str(ctx.result),
            "--progress", progress, *flags]
    if case.inject:
        code = case.inject + "\nimport sys\nfrom ms2mg_converter.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "ms2mg_converter", *args]
    if case.user is not None:
        if shutil.which("setpriv") is None or os.geteuid() != 0:
            raise Unsupported("running as another user needs root and setpriv")
        cmd = ["setpriv", f"--reuid={case.user}", f"--regid={case.user}", "--clear-groups", *cmd]
    return cmd


def execute(case: Case, cmd: list[str], env: dict[str, str]) -> tuple[int, str, dict[str, Any]]:
    if case.signal is None:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
        return r.returncode, r.stderr, {}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None
    first = p.stdout.readline()
    p.send_signal(case.signal)
    out, err = p.communicate(timeout=300)
    return p.returncode, err, {"progress_at_signal": first.strip(), "progress_after": len(out.splitlines())}


def run_case(case: Case, root: Path) -> Outcome:
    """Build and run one case under `root` (a `world_dir`); always cleans up mounts and attributes."""
    ctx = Ctx(root)
    try:
        flags = case.build(ctx)
        before = _snapshot(ctx.dst)
        env = {**os.environ, "HOME": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.perf_counter()
        code, stderr, extra = execute(case, command_for(case, ctx, flags), env)
        seconds = time.perf_counter() - t0
        result = json.loads(ctx.result.read_text()) if ctx.result.is_file() else None
        parent = ctx.dst.parent
        leftovers = sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{ctx.dst.name}.ms2mg-")) \
            if parent.is_dir() else []
        changed = _snapshot(ctx.dst) != before
        errors = [line for line in stderr.splitlines() if line.startswith("ms2mg: error:")]
        return Outcome(case.name, code, stderr, result, errors, leftovers, changed, seconds, extra)
    finally:
        ctx.close()


def problems(case: Case, o: Outcome) -> list[str]:
    """Everything about an outcome that differs from the case's promise (empty: the case passes)."""
    found = []
    if o.exit_code != case.exit_code:
        found.append(f"exit code {o.exit_code}, expected {case.exit_code}")
    if "Traceback" in o.stderr:
        found.append("a Python traceback on stderr")
    if len(o.error_lines) != 1:
        found.append(f"{len(o.error_lines)} 'ms2mg: error:' lines on stderr, expected 1")
    if o.result is None:
        found.append("no --result-file written")
    else:
        r = o.result
        if (r.get("status"), r.get("reason"), r.get("exitCode")) != ("Failed", case.reason, case.exit_code):
            found.append(f"result {r.get('status')}/{r.get('reason')}/{r.get('exitCode')}, expected "
                         f"Failed/{case.reason}/{case.exit_code}")
        msg = r.get("message", "")
        if "\n\n" in msg or not msg:
            found.append("the message is empty or more than one paragraph")
        if o.error_lines and msg.splitlines()[0] not in o.error_lines[0]:
            found.append("stderr and the result file disagree on the message")
        for word in case.mentions:
            if word not in msg:
                found.append(f"the message does not mention {word!r}: {msg}")
    if o.leftovers:
        found.append(f"left beside the destination: {o.leftovers}")
    if o.destination_changed:
        found.append("the destination changed")
    return found


def table(outcomes: list[tuple[Case, Outcome]]) -> str:
    """The markdown table of docs/reliability.md."""
    rows = ["| # | case | what is wrong | exit | reason | message (abridged) | left at destination |",
            "|---|---|---|---|---|---|---|"]
    for i, (case, o) in enumerate(outcomes, 1):
        msg = o.message.replace("|", "\\|").replace("\n", " ")
        msg = msg if len(msg) <= 170 else msg[:167] + "..."
        left = "nothing" if not o.leftovers and not o.destination_changed else "CHANGED"
        if case.name in ("destination-not-empty", "overwrite-foreign-directory", "destination-is-a-file"):
            left = "the user's data, unchanged" if left == "nothing" else left
        reason = o.result.get("reason") if o.result else "-"
        rows.append(f"| {i} | `{case.name}` | {case.what} | {o.exit_code} | {reason} | {msg} | {left} |")
    return "\n".join(rows)


def main() -> int:
    outcomes = []
    failed = 0
    for case in CASES:
        with world_dir() as root:
            try:
                o = run_case(case, root)
            except Unsupported as e:
                print(f"{case.name}: skipped ({e})", file=sys.stderr)
                continue
        bad = problems(case, o)
        failed += bool(bad)
        print(f"{case.name}: {'ok' if not bad else 'FAIL ' + '; '.join(bad)} ({o.seconds:.1f} s)", file=sys.stderr)
        outcomes.append((case, o))
    print(table(outcomes))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
