"""Reading safetensors headers: valid layouts are indexed, damaged files give a clear SourceError."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ms2mg_converter.errors import SourceError
from ms2mg_converter.source.index import open_source, read_file


def write_raw(path: Path, header: dict[str, object], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_reads_what_safetensors_wrote(tmp_path):
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}, str(tmp_path / "m.safetensors"))
    _, infos = read_file(tmp_path / "m.safetensors")
    by = {i.name: i for i in infos}
    assert by["a"].dtype == "F32" and by["a"].shape == (3, 4) and by["a"].nbytes == 48
    assert by["b"].dtype == "BF16" and by["b"].nbytes == 10
    raw = (tmp_path / "m.safetensors").read_bytes()
    expected = torch.ones(5, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    assert raw[by["b"].offset: by["b"].offset + 10] == expected


@pytest.mark.parametrize(("content", "message"), [
    (b"", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 10**12), "header claims"),
    (struct.pack("<Q", 5) + b"{notj", "does not parse"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
])
def test_broken_headers(tmp_path, content, message):
    p = tmp_path / "x.safetensors"
    p.write_bytes(content)
    with pytest.raises(SourceError, match=message):
        read_file(p)


@pytest.mark.parametrize(("entry", "message"), [
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "needs 8 bytes"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}, "needs 8 bytes"),
    ({"dtype": "F32", "shape": [200], "data_offsets": [0, 800]}, "ends at byte 800"),
    ({"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}, "unknown dtype"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}, "invalid shape"),
    ({"dtype": "F32", "shape": [2], "data_offsets": "0-8"}, "invalid data_offsets"),
    ("nope", "is not an object"),
])
def test_bad_tensor_entries(tmp_path, entry, message):
    p = write_raw(tmp_path / "x.safetensors", {"w": entry}, b"\0" * 8)
    with pytest.raises(SourceError, match=message) as e:
        read_file(p)
    assert ("x.safetensors" in str(e.value) and "'w'" in str(e.value)) or "w" in str(e.value)


def test_overlapping_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    with pytest.raises(SourceError, match="overlap"):
        read_file(write_raw(tmp_path / "x.safetensors", header, b"\0" * 12))


def test_truncated_file(tmp_path):
    save_file({"a": torch.zeros(100)}, str(tmp_path / "m.safetensors"))
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(raw[:-10])
    with pytest.raises(SourceError, match="ends at byte 400"):
        open_source(tmp_path / "m.safetensors")


def test_duplicate_key_across_shards(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "1.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "2.safetensors"))
    with pytest.raises(SourceError, match="stored twice"):
        open_source(tmp_path)


def test_empty_and_missing(tmp_path):
    with pytest.raises(SourceError, match=r"holds no \*\.safetensors"):
        open_source(tmp_path)
    with pytest.raises(SourceError, match="no such file"):
        open_source(tmp_path / "nope")


def test_index_json(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "s2.safetensors"))
    save_file({"c": torch.zeros(2)}, str(tmp_path / "stale.safetensors"))  # not in the index: not read
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    assert sorted(open_source(tmp_path).tensors) == ["a", "b"]
    index.write_text(json.dumps({"weight_map": {"a": "s2.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(SourceError, match=r"puts tensor 'a' in s2\.safetensors"):
        open_source(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(SourceError, match="do not exist"):
        open_source(tmp_path)
    index.write_text("{}")
    with pytest.raises(SourceError, match="weight_map"):
        open_source(tmp_path)
