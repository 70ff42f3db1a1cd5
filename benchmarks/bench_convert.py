#!/usr/bin/env python3
"""Benchmark ms2mg against the I/O floor (`cp` + `sync`) and a naive converter. Prints numbers.

    .venv/bin/python benchmarks/bench_convert.py             # bench-1b and bench-2b, TP2/PP2, TP1/PP1, torch_dist
    .venv/bin/python benchmarks/bench_convert.py --quick     # a ~0.4 GB model, one run each
    .venv/bin/python benchmarks/bench_convert.py --json      # machine-readable results on stdout

bench-1b: 16 layers, hidden 2048, ffn 5632, 16 heads, 4 query groups, vocab 64000, linear biases, tied,
SwiGLU, RMSNorm, fp32 (3.41 GB). bench-2b: the same with 32 layers. The models are generated in a
temporary directory (on the same disk as the outputs) tensor by tensor, so generating needs no more
memory than one tensor. Every measured run is preceded by the same page-cache warm-up (the source is read
once, earlier outputs are deleted and `sync`ed); each figure is the median of `--runs` runs after one
unmeasured warm-up run. Wall and CPU seconds (wait4), peak RSS (VmHWM of the process, sampled every
10 ms until exit; for `cp_sync` that is the shell's) and the kernel's I/O counters (`/proc/<pid>/io`)
are reported per command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NAIVE = HERE / "naive_convert.py"


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int = 2048
    ffn: int = 5632
    heads: int = 16
    groups: int = 4
    vocab: int = 64000

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        d = self.hidden // self.heads
        qkv = (self.heads + 2 * self.groups) * d
        out: list[tuple[str, tuple[int, ...]]] = [("embedding.word_embeddings.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            p = f"decoder.layers.{i}."
            out += [(p + "input_layernorm.weight", (self.hidden,)),
                    (p + "self_attention.linear_qkv.weight", (qkv, self.hidden)),
                    (p + "self_attention.linear_qkv.bias", (qkv,)),
                    (p + "self_attention.linear_proj.weight", (self.hidden, self.heads * d)),
                    (p + "self_attention.linear_proj.bias", (self.hidden,)),
                    (p + "pre_mlp_layernorm.weight", (self.hidden,)),
                    (p + "mlp.linear_fc1.weight", (2 * self.ffn, self.hidden)),
                    (p + "mlp.linear_fc1.bias", (2 * self.ffn,)),
                    (p + "mlp.linear_fc2.weight", (self.hidden, self.ffn)),
                    (p + "mlp.linear_fc2.bias", (self.hidden,))]
        out.append(("decoder.final_layernorm.weight", (self.hidden,)))
        return out

    def flags(self) -> list[str]:
        return ["--num-attention-heads", str(self.heads), "--num-query-groups", str(self.groups),
                "--qkv-layout", "grouped", "--fc1-layout", "interleaved", "--true-vocab-size", str(self.vocab)]


MODELS = {"bench-1b": Model("bench-1b", 16), "bench-2b": Model("bench-2b", 32),
          "quick": Model("quick", 4, hidden=1024, ffn=2816, vocab=32000)}


def generate(model: Model, path: Path) -> int:
    """Write an fp32 safetensors file tensor by tensor (deterministic values, O(tensor) memory)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    specs = model.tensors()
    for name, shape in specs:
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, shape in specs:
            f.write((rng.standard_normal(shape, dtype=np.float32) * 0.02).tobytes())
    return path.stat().st_size


@dataclass
class Sample:
    wall: float
    cpu: float
    rss_mib: float
    io: dict[str, int] = field(default_factory=dict)


def _poll_io(pid: int, box: dict[str, int], done: threading.Event) -> None:
    """Sample the kernel's I/O counters and the RSS high-water mark (VmHWM) until the process exits.

    VmHWM belongs to the process's own address space, unlike ru_maxrss, which after fork + exec also
    counts the parent's (this benchmark's) memory.
    """
    while not done.is_set():
        try:
            text = Path(f"/proc/{pid}/io").read_text()
            box.update({k: int(v) for k, v in (line.split(": ") for line in text.splitlines())})
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    box["vmhwm_kib"] = int(line.split()[1])
        except (OSError, ValueError):
            pass
        time.sleep(0.01)


def measure(cmd: list[str]) -> Sample:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    box: dict[str, int] = {}
    done = threading.Event()
    poller = threading.Thread(target=_poll_io, args=(proc.pid, box, done), daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    io = {k: box[k] for k in ("rchar", "wchar", "read_bytes", "write_bytes") if k in box}
    return Sample(wall, usage.ru_utime + usage.ru_stime, box.get("vmhwm_kib", 0) / 1024, io)


def warm(source: Path, outputs: list[Path]) -> None:
    for out in outputs:
        shutil.rmtree(out, ignore_errors=True)
    os.sync()
    with source.open("rb") as f:
        while f.read(64 << 20):
            pass


def bench(cmd: list[str], source: Path, outputs: list[Path], runs: int,
          setup: list[str] | None = None) -> dict[str, object]:
    samples = []
    for i in range(runs + 1):
        warm(source, outputs)
        if setup:
            subprocess.run(setup, check=True)
        s = measure(cmd)
        if i:
            samples.append(s)
    best = {k: statistics.median(getattr(s, k) for s in samples) for k in ("wall", "cpu", "rss_mib")}
    io = {k: int(statistics.median(s.io.get(k, 0) for s in samples)) for k in samples[0].io}
    return {**best, "io": io, "runs": [asdict(s) for s in samples]}


def run_model(model: Model, work: Path, runs: int, py: str) -> dict[str, object]:
    src_dir = work / model.name
    src_dir.mkdir(exist_ok=True)
    source = src_dir / "model.safetensors"
    t = time.perf_counter()
    size = generate(model, source)
    print(f"# generated {model.name}: {size / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    out = work / "out"
    res: dict[str, object] = {"source_bytes": size}
    res["cp_sync"] = bench(["sh", "-c", f"mkdir -p {out} && cp {source} {out}/ && sync"], source, [out], runs)
    res["naive"] = bench([py, str(NAIVE), str(source), str(out / "naive.pt")], source, [out], runs,
                         setup=["mkdir", "-p", str(out)])
    ms2mg = [py, "-m", "ms2mg_converter", "convert", "--load-dir", str(source), *model.flags(), "--progress", "none"]
    for tp, pp in ((2, 2), (1, 1)):
        key = f"tp{tp}pp{pp}"
        args = [*ms2mg, "--save-dir", str(out), "--tp", str(tp), "--pp", str(pp)]
        res[f"ms2mg_{key}_noverify"] = bench([*args, "--no-verify"], source, [out], runs)
        res[f"ms2mg_{key}"] = bench(args, source, [out], runs)
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([*args, "--no-verify"], check=True, capture_output=True)
        res[f"verify_{key}"] = bench([py, "-m", "ms2mg_converter", "verify", "--load-dir", str(source),
                                      "--save-dir", str(out)], source, [], runs)
    args = [*ms2mg, "--save-dir", str(out), "--ckpt-format", "torch_dist"]  # global tensors: one file, any TP/PP
    res["ms2mg_torchdist_noverify"] = bench([*args, "--no-verify"], source, [out], runs)
    res["ms2mg_torchdist"] = bench(args, source, [out], runs)
    shutil.rmtree(out, ignore_errors=True)
    source.unlink()
    return res


def ratios(results: dict[str, dict[str, object]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, res in results.items():
        cp, naive = res["cp_sync"]["wall"], res["naive"]["wall"]  # type: ignore[index]
        for key in ("tp2pp2", "tp1pp1"):
            for suffix in ("_noverify", ""):
                w = res[f"ms2mg_{key}{suffix}"]["wall"]  # type: ignore[index]
                out[f"{name} {key}{suffix} / cp"] = w / cp
                out[f"{name} {key}{suffix} / naive"] = w / naive
            out[f"{name} verify {key} / convert {key}"] = (res[f"verify_{key}"]["wall"]  # type: ignore[index]
                                                         / res[f"ms2mg_{key}_noverify"]["wall"])  # type: ignore[index]
        for suffix in ("_noverify", ""):
            w = res[f"ms2mg_torchdist{suffix}"]["wall"]  # type: ignore[index]
            out[f"{name} torch_dist{suffix} / cp"] = w / cp
            out[f"{name} torch_dist{suffix} / torch tp1pp1{suffix}"] = w / res[f"ms2mg_tp1pp1{suffix}"]["wall"]  # type: ignore[index]
    if "bench-1b" in results and "bench-2b" in results:
        for key in ("tp2pp2", "tp1pp1"):
            a = results["bench-1b"][f"ms2mg_{key}"]["rss_mib"]  # type: ignore[index]
            b = results["bench-2b"][f"ms2mg_{key}"]["rss_mib"]  # type: ignore[index]
            out[f"RSS(2b)/RSS(1b) {key}"] = b / a
    return out


def table(results: dict[str, dict[str, object]]) -> str:
    lines = ["| model | command | wall s | CPU s | peak RSS MiB | wchar GB | write_bytes GB |",
             "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for cmd, r in res.items():
            if not isinstance(r, dict):
                continue
            io = r["io"]
            lines.append(f"| {name} | {cmd} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['rss_mib']:.0f} | "
                         f"{io.get('wchar', 0) / 1e9:.2f} | {io.get('write_bytes', 0) / 1e9:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small model, one run after the warm-up")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    p.add_argument("--runs", type=int, default=None, help="measured runs per command (default 3; 1 with --quick)")
    p.add_argument("--workdir", type=Path, default=None, help="where models and outputs go (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args()
    models = a.models or (["quick"] if a.quick else ["bench-1b", "bench-2b"])
    runs = a.runs or (1 if a.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="ms2mg-bench-", dir=a.workdir))
    try:
        results = {m: run_model(MODELS[m], work, runs, sys.executable) for m in models}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "runs": runs}
    if a.json:
        print(json.dumps({"meta": meta, "results": results, "ratios": ratios(results)}, indent=2))
        return
    print(f"# {meta}")
    print(table(results))
    for k, v in ratios(results).items():
        print(f"{k}: {v:.2f}")


if __name__ == "__main__":
    main()
