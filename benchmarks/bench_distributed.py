"""Benchmark: converting a distributed MindFormers source (rank_N/ + strategy) vs the same model merged.

Generates bench_convert.py's model (default bench-1b, 3.41 GB fp32), cuts it into rank files with the test
helper `tests/converter/_mf_distributed.py` (TP4 x DP1, and TP2 x DP2 with the parallel optimizer's dim-0
cut, so every slice is stored twice), then times `ms2mg convert` TP2/PP2 of the merged file and of each
distributed source the same way as bench_convert.py (separate processes, median of --runs after a warm-up,
source read once before every run so it is cached; peak RSS = VmHWM).

    .venv/bin/python benchmarks/bench_distributed.py [--model quick] [--runs 3] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import bench_convert as bc  # noqa: E402

from tests.converter._mf_distributed import Layout, distribute  # noqa: E402

LAYOUTS = {"tp4": Layout(tp=4, dp=1, extra_keys=False),
           "tp2-dp2-opt": Layout(tp=2, dp=2, opt_shard=True, extra_keys=False)}


def _warm_all(root: Path, outputs: list[Path]) -> None:
    for out in outputs:
        shutil.rmtree(out, ignore_errors=True)
    os.sync()
    for f in sorted(root.rglob("*.safetensors")):
        with f.open("rb") as fh:
            while fh.read(64 << 20):
                pass


def _bench(cmd: list[str], root: Path, out: Path, runs: int) -> dict[str, object]:
    samples = []
    for i in range(runs + 1):
        _warm_all(root, [out])
        s = bc.measure(cmd)
        if i:
            samples.append(s)
    med = sorted(samples, key=lambda s: s.wall)[len(samples) // 2]
    return {"wall": med.wall, "cpu": med.cpu, "rss_mib": max(s.rss_mib for s in samples),
            "runs": [round(s.wall, 2) for s in samples]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(bc.MODELS), default="bench-1b")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    model = bc.MODELS[a.model]
    work = Path(tempfile.mkdtemp(prefix="ms2mg-bench-dist-", dir=a.workdir))
    try:
        merged = work / "merged"
        merged.mkdir()
        size = bc.generate(model, merged / "model.safetensors")
        py = sys.executable
        base = [py, "-m", "ms2mg_converter", "convert", *model.flags(), "--progress", "none", "--tp", "2",
                "--pp", "2"]
        out = work / "out"
        res: dict[str, object] = {"model": model.name, "source_bytes": size}
        sources = {"merged": merged}
        for name, lay in LAYOUTS.items():
            ckpt = work / name / "checkpoint"
            distribute(merged, ckpt, lay, model.layers, tied=False)
            sources[name] = ckpt
        for name, src in sources.items():
            for verify in (False, True):
                cmd = [*base, "--load-dir", str(src), "--save-dir", str(out), *([] if verify else ["--no-verify"])]
                key = f"{name}{'' if verify else '_noverify'}"
                res[key] = _bench(cmd, src, out, a.runs)
                print(f"# {key}: {res[key]}", file=sys.stderr)
        print(json.dumps(res, indent=1) if a.json else _table(res))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _table(res: dict[str, object]) -> str:
    rows = ["| source | verify | wall s (median) | runs | CPU s | peak RSS MiB |", "|---|---|---|---|---|---|"]
    for key, v in res.items():
        if isinstance(v, dict):
            name, verify = key.removesuffix("_noverify"), "no" if key.endswith("_noverify") else "yes"
            rows.append(f"| {name} | {verify} | {v['wall']:.2f} | {', '.join(map(str, v['runs']))} | "
                        f"{v['cpu']:.2f} | {v['rss_mib']:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
