"""The torch-free rank-file writer: what it writes is what torch.save writes, as far as every reader can tell."""

from __future__ import annotations

import argparse
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from ms2mg_converter.config import DType
from ms2mg_converter.model.megatron_args import TorchGlobal
from ms2mg_converter.verify.ckptfile import peek
from ms2mg_converter.write import zipwriter
from ms2mg_converter.write.torchpickle import TensorRef, dumps

ARRAYS = {
    "w": np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16),
    "b": np.linspace(-1, 1, 5, dtype=np.float32),
    "h": np.arange(6, dtype=np.float16).reshape(2, 3),
    "e": np.zeros((0, 4), dtype=np.float32),
}
DT = {"w": DType.BF16, "b": DType.FP32, "h": DType.FP16, "e": DType.FP32}


def write(path: Path, chunk: int = 7) -> None:
    model = OrderedDict()
    for i, name in enumerate(ARRAYS):
        model[name] = TensorRef(str(i), DT[name], ARRAYS[name].shape)
        model[f"{name}._extra_state"] = None
    obj = {"args": argparse.Namespace(num_layers=2, params_dtype=TorchGlobal("torch", "bfloat16"), x=None),
           "checkpoint_version": 3.0, "iteration": 1, "model": model}
    with path.open("wb") as f:
        z = zipwriter.ZipStreamWriter(f)
        z.add("archive/data.pkl", dumps(obj))
        z.add("archive/byteorder", b"little")
        for i, arr in enumerate(ARRAYS.values()):
            raw = arr.view(np.uint8).tobytes()
            z.begin(f"archive/data/{i}", len(raw))
            for s in range(0, len(raw), chunk):
                z.write(raw[s: s + chunk])
            z.end()
        z.add("archive/version", b"3\n")
        z.close()


def expected_torch(name: str) -> torch.Tensor:
    arr = ARRAYS[name]
    if name == "w":
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(arr.copy())


@pytest.mark.parametrize("mmap", [False, True])
def test_torch_load_weights_only(tmp_path, mmap):
    p = tmp_path / "f.pt"
    write(p)
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = torch.load(p, weights_only=True, mmap=mmap)
    assert sd["args"].num_layers == 2 and sd["args"].params_dtype is torch.bfloat16
    assert list(sd["model"]) == [k for n in ARRAYS for k in (n, f"{n}._extra_state")]
    for name in ARRAYS:
        assert torch.equal(sd["model"][name], expected_torch(name)), name
        assert sd["model"][f"{name}._extra_state"] is None


def test_weights_only_without_allowlist_refuses_namespace(tmp_path):
    p = tmp_path / "f.pt"
    write(p)
    with pytest.raises(Exception, match="Namespace"):
        torch.load(p, weights_only=True)


def test_zip_is_valid_and_aligned(tmp_path):
    p = tmp_path / "f.pt"
    write(p)
    raw = p.read_bytes()
    with zipfile.ZipFile(p) as z:
        assert z.testzip() is None  # every CRC-32 matches
        rf = peek(p)
        for name, (start, _) in rf.data_offsets.items():
            assert start % 64 == 0, name
        info = z.getinfo("archive/data/0")
        assert info.flag_bits & 0x08  # data descriptor, as torch writes
    assert raw[:4] == b"PK\x03\x04"


def test_same_tensors_as_torch_save(tmp_path):
    p = tmp_path / "f.pt"
    write(p)
    ref = {n: expected_torch(n) for n in ARRAYS}
    torch.save(ref, tmp_path / "ref.pt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        ours = torch.load(p, weights_only=True)["model"]
    theirs = torch.load(tmp_path / "ref.pt", weights_only=True)
    for n in ARRAYS:
        assert torch.equal(ours[n], theirs[n]) and ours[n].dtype == theirs[n].dtype


def test_zip64_fields(tmp_path, monkeypatch):
    """Force the ZIP64 code paths (normally only past 4 GiB) by lowering the limit."""
    monkeypatch.setattr(zipwriter, "_LIMIT", 16)
    p = tmp_path / "f.pt"
    write(p)
    with zipfile.ZipFile(p) as z:
        assert z.testzip() is None
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = torch.load(p, weights_only=True)
    for name in ARRAYS:
        assert torch.equal(sd["model"][name], expected_torch(name))


def test_restricted_reader_refuses_foreign_globals(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": zipfile.ZipInfo("boom")}, p)
    with pytest.raises(Exception, match=r"refusing to load global zipfile\.ZipInfo"):
        peek(p)


def test_writer_rejects_size_mismatch(tmp_path):
    with (tmp_path / "x").open("wb") as f:
        z = zipwriter.ZipStreamWriter(f)
        z.begin("a", 4)
        with pytest.raises(RuntimeError, match="more than"):
            z.write(b"12345")
        z.write(b"12")
        with pytest.raises(RuntimeError, match="closed after 2"):
            z.end()
