"""What `ms2mg inspect` prints: the architecture, layouts, dropped keys and the full plan."""

from __future__ import annotations

from typing import Any

from ms2mg_converter.cli.memory import convert_peak, peak_memory_estimate, verify_peak
from ms2mg_converter.pipeline import describe
from ms2mg_converter.plan import ExtraEntry, Plan


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n / 1e3:.1f} kB"


def describe_plan(plan: Plan) -> str:
    a = plan.arch
    lines = [
        f"source: {plan.config.load_dir} ({len(plan.source.files)} file(s), {len(plan.source.tensors)} tensors, "
        f"{_gb(plan.source.total_bytes)}), naming family: {a.family}",
        "architecture:",
        *(f"  {k}: {v}" for k, v in a.model_dump(mode="json").items() if k != "family"),
        f"dropped keys ({len(plan.dropped)}): {', '.join(plan.dropped) or '-'}",
        f"ignored keys ({len(plan.ignored)}): {', '.join(plan.ignored) or '-'}",
        f"plan: TP {plan.config.tensor_parallel} x PP {plan.config.pipeline_parallel}"
        f"{f' x EP {plan.config.moe.expert_parallel}' if plan.arch.moe else ''}, {plan.config.dtype}, "
        f"{plan.config.transformer_impl} key names, {len(plan.files)} file(s), {_gb(plan.tensor_bytes)} of tensors",
        f"peak memory estimate: {_gb(convert_peak(plan))} converting, {_gb(verify_peak(plan))} verifying",
        "pipeline layout (global layers per stage and state dict):",
        *(f"  {line}" for line in describe(a.num_layers, plan.config.pipeline_parallel, plan.config.pipeline_layout)),
    ]
    for f in plan.files:
        ep = f", ep {f.ep_rank}" if plan.config.moe.expert_parallel > 1 else ""
        lines.append(f"  {f.path}  (tp {f.tp_rank}, pp {f.pp_rank}{ep}, {_gb(f.tensor_bytes)})")
        for chunk in f.chunks:
            indent = "    "
            if len(f.chunks) > 1:
                lines.append(f"    {chunk.key}: global layers {list(chunk.layers)}")
                indent = "      "
            for e in chunk.entries():
                if isinstance(e, ExtraEntry):
                    lines.append(f"{indent}{e.key}: None")
                else:
                    lines.append(f"{indent}{e.key}: {e.dtype} {list(e.shape)} {_gb(e.nbytes)} <- {e.source}")
    return "\n".join(lines)


def plan_json(plan: Plan) -> dict[str, Any]:
    files = []
    for f in plan.files:
        entries = [{"model": m, "key": e.key, "value": None} if isinstance(e, ExtraEntry) else
                   {"model": m, "key": e.key, "source": e.source, "dtype": str(e.dtype), "shape": list(e.shape),
                    "bytes": e.nbytes, "inputs": [r.name for r in e.inputs], "op": e.op,
                    "runs": [[r.dst, r.count, r.src, r.start, r.step] for r in e.runs],
                    "columns": list(e.cols) if e.cols else None} for m, e in f.chunk_entries()]
        files.append({"path": f.path, "tp_rank": f.tp_rank, "pp_rank": f.pp_rank, "ep_rank": f.ep_rank,
                      "bytes": f.tensor_bytes,
                      "groups": len(f.groups), "layers": {c.key: list(c.layers) for c in f.chunks},
                      "entries": entries})
    return {"architecture": plan.arch.model_dump(mode="json"), "config": plan.config.model_dump(mode="json"),
            "dropped_keys": list(plan.dropped), "ignored_keys": list(plan.ignored),
            "megatron_args": {k: str(v) if hasattr(v, "module") else v for k, v in plan.args.items()},
            "peak_memory_estimate": peak_memory_estimate(plan),
            "peak_memory": {"convert": convert_peak(plan), "verify": verify_peak(plan)},
            "tensor_bytes": plan.tensor_bytes,
            "files": files}
