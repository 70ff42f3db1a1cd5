"""The subcommands behind `ms2mg` (argument parsing and exit codes live in `cli.py`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ms2mg_converter import __version__
from ms2mg_converter.cli.args import to_config
from ms2mg_converter.cli.progress import make_progress, no_progress, say
from ms2mg_converter.cli.report import describe_plan, plan_json
from ms2mg_converter.config import ConvertConfig
from ms2mg_converter.errors import UsageError, VerificationError
from ms2mg_converter.model.facts import describe_defaulted
from ms2mg_converter.plan import Plan, build_plan
from ms2mg_converter.result import ConversionResult

log = logging.getLogger("ms2mg")


def peak_rss_bytes() -> int | None:
    """High-water mark of this process's resident memory (VmHWM), or None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _preload_verifier() -> None:
    """Import torch and safetensors on a side thread while the conversion runs (verification needs them)."""

    def load() -> None:
        import ms2mg_converter.verify.checkpoint  # noqa: F401

    threading.Thread(target=load, name="ms2mg-preload", daemon=True).start()


def _check_paths(cfg: ConvertConfig) -> None:
    if cfg.save_dir is None:
        return
    load, save = cfg.load_dir.absolute(), cfg.save_dir.absolute()
    if save == load or save in load.parents:
        raise UsageError(f"--save-dir {cfg.save_dir} contains the source --load-dir {cfg.load_dir}; writing "
                         "there could destroy the source. Choose a separate directory.")


def convert(ns: argparse.Namespace) -> ConversionResult:
    from ms2mg_converter.run.execute import run_plan

    t0 = time.perf_counter()
    cfg = to_config(ns)
    _check_paths(cfg)
    plan = build_plan(cfg)
    log.info("%s model: %d layers, hidden %d, %d heads / %d groups, vocab %d -> %d; writing %d file(s) "
             "(TP %d x PP %d, %s)", plan.arch.family, plan.arch.num_layers, plan.arch.hidden_size,
             plan.arch.num_attention_heads, plan.arch.num_query_groups, plan.arch.source_vocab_rows,
             plan.arch.padded_vocab_size, len(plan.files), cfg.tensor_parallel, cfg.pipeline_parallel, cfg.dtype)
    if plan.dropped:
        log.info("dropped %d optimizer/bookkeeping key(s), e.g. %s", len(plan.dropped), plan.dropped[0])
    if plan.arch.defaulted:
        log.warning("warning: %s", describe_defaulted(plan.arch))
    if not cfg.overwrite:
        done = _already_converted(plan, t0)
        if done is not None:
            return done
    progress = make_progress(ns.progress) or no_progress
    if cfg.verify:
        _preload_verifier()
    stats = run_plan(plan, sys.argv, progress)
    for p in stats.stale_removed:
        log.info("removed the staging directory of an earlier, interrupted run: %s", p)
    seconds = time.perf_counter() - t0
    rss = peak_rss_bytes()
    log.info("wrote %d file(s), %.2f GB in %.1f s%s, peak memory %s -> %s", len(stats.files), stats.bytes / 1e9,
             seconds, " (verified)" if stats.verified else " (not verified: --no-verify)",
             f"{rss / 2**20:.0f} MiB" if rss else "unknown", cfg.save_dir)
    return ConversionResult(
        status="Succeeded", reason="Converted", message=f"converted {len(stats.files)} file(s) to {cfg.save_dir}",
        files=len(stats.files) + 2, bytes=stats.bytes, seconds=round(seconds, 3),
        padded_vocab_size=plan.arch.padded_vocab_size, manifest_path=str(stats.manifest),
        verified=stats.verified, peak_rss_bytes=rss, converter_version=__version__,
        defaulted=list(plan.arch.defaulted))


def _already_converted(plan: Plan, t0: float) -> ConversionResult | None:
    from ms2mg_converter.write.manifest import MANIFEST_NAME, matching_checkpoint
    from ms2mg_converter.write.staging import Staging

    save = plan.config.save_dir
    if save is None or not (save / MANIFEST_NAME).is_file():
        return None
    for p in Staging(save, overwrite=False).tidy():
        if ".ms2mg-staging-" in p.name:
            log.info("removed the staging directory of an earlier, interrupted run: %s", p)
    manifest = matching_checkpoint(plan)
    if manifest is None:
        return None
    log.info("%s already holds this exact conversion (same flags and source; every file matches its sha256 in "
             "the manifest): nothing to do. Pass --overwrite to convert again.", save)
    return ConversionResult(
        status="Succeeded", reason="AlreadyConverted", message=f"{save} already holds this conversion",
        files=len(manifest.files) + 2, bytes=sum(f.bytes for f in manifest.files),
        seconds=round(time.perf_counter() - t0, 3), padded_vocab_size=plan.arch.padded_vocab_size,
        manifest_path=str(save / MANIFEST_NAME) if save else None, verified=manifest.verified,
        converter_version=__version__, defaulted=list(plan.arch.defaulted))


def inspect(ns: argparse.Namespace) -> ConversionResult:
    cfg = to_config(ns)
    plan = build_plan(cfg)
    say(json.dumps(plan_json(plan), indent=2) if ns.json else describe_plan(plan))
    return ConversionResult(status="Succeeded", reason="Inspected", converter_version=__version__,
                            padded_vocab_size=plan.arch.padded_vocab_size)


def _verify_plan(ns: argparse.Namespace) -> tuple[Plan, dict[str, str] | None]:
    from ms2mg_converter.write.manifest import read_manifest

    manifest = read_manifest(ns.save_dir)
    if manifest is None:
        log.info("no manifest in %s: using the flags to describe the conversion", ns.save_dir)
        return build_plan(to_config(ns)), None
    cfg = manifest.config.model_copy(update={"load_dir": ns.load_dir, "save_dir": ns.save_dir})
    return build_plan(cfg), {f.path: f.sha256 for f in manifest.files}


def verify(ns: argparse.Namespace) -> ConversionResult:
    from ms2mg_converter.write.manifest import FileDigests

    if not Path(ns.save_dir).is_dir():
        raise UsageError(f"--save-dir {ns.save_dir}: no such checkpoint directory.")
    plan, hashes = _verify_plan(ns)
    with FileDigests(ns.save_dir, hashes) if hashes is not None else contextlib.nullcontext() as digests:
        from ms2mg_converter.verify.checkpoint import verify_checkpoint  # imports torch while the files are hashed

        report = verify_checkpoint(plan, ns.save_dir, digests)
    for problem in report.problems:
        say(f"MISMATCH {problem}")
    if not report.ok:
        raise VerificationError(f"{len(report.problems)} problem(s) in {ns.save_dir} (listed above).")
    say(f"OK: {report.files} file(s), {report.tensors} tensors ({report.bytes / 1e9:.2f} GB) match the "
          f"source in {report.seconds:.1f} s")
    return ConversionResult(status="Succeeded", reason="Verified", verified=True, files=report.files,
                            bytes=report.bytes, seconds=round(report.seconds, 3), converter_version=__version__)


def demo(ns: argparse.Namespace, cli_main: Callable[[Sequence[str]], int]) -> ConversionResult:
    from ms2mg_converter.demo.demo import run_demo

    return run_demo(ns.workdir, cli_main)
