"""`ms2mg`: convert, inspect, verify, demo. Exit codes: see `errors.ExitCode` and README.md."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from ms2mg_converter import __version__
from ms2mg_converter.cli.args import add_plan_flags, reference_notes, to_config
from ms2mg_converter.errors import ConversionError, ExitCode, InterruptedConversion
from ms2mg_converter.result import ConversionResult
from ms2mg_converter.write.staging import shielded

log = logging.getLogger("ms2mg")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ms2mg", description="Convert MindSpore Transformers (MindFormers) "
                                "safetensors checkpoints into Megatron-LM checkpoints.")
    p.add_argument("--version", action="version", version=f"ms2mg {__version__}")
    p.add_argument("--log-format", choices=["plain", "json"], default="plain", help="stderr log format")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("convert", help="write a Megatron-LM checkpoint", description="Convert a checkpoint. "
                       "Accepts the MindSpore docs' reference command flags verbatim.")
    add_plan_flags(c, save=True)
    g = c.add_argument_group("run")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier ms2mg output at --save-dir")
    g.add_argument("--no-verify", action="store_true", help="skip checking the output against the source")
    g.add_argument("--progress", choices=["auto", "bar", "json", "none"], default="auto",
                   help="progress display: a bar on a terminal (auto), JSON lines on stdout, or none")
    g.add_argument("--result-file", type=Path, metavar="PATH",
                   help="write a JSON result object here on exit, success or failure")
    i = sub.add_parser("inspect", help="show the inferred architecture and the plan; write nothing")
    add_plan_flags(i, save=False)
    i.add_argument("--json", action="store_true", help="print the plan as JSON")
    i.add_argument("--no-verify", action="store_true",
                   help="estimate the peak memory of a conversion without verification")
    v = sub.add_parser("verify", help="check a written checkpoint against its source")
    add_plan_flags(v, save=True)
    d = sub.add_parser("demo", help="convert a built-in sample checkpoint (TP2/PP2) and verify it")
    d.add_argument("--workdir", type=Path, default=None, help="keep the sample and output here")
    return p


def _setup_logging(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from ms2mg_converter.cli.logjson import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("ms2mg: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGINT: stop the run (its staging directory is removed), unless the commit has begun."""
    name = signal.Signals(signum).name
    if shielded():
        log.warning("%s received while the checkpoint is being committed or cleaned up; finishing that first",
                    name)
        return
    raise InterruptedConversion(f"stopped by signal {name} before the checkpoint was complete; nothing was "
                                "written to --save-dir (an existing checkpoint there is unchanged)")


def _write_result(path: Path | None, result: ConversionResult) -> None:
    if path is None:
        return
    try:
        path.write_text(result.to_json(), encoding="utf-8")
    except OSError as e:
        log.error("cannot write --result-file %s: %s", path, e.strerror or e)


def _run(ns: argparse.Namespace, handler: Callable[[argparse.Namespace], ConversionResult]) -> int:
    t0 = time.perf_counter()
    result_file = getattr(ns, "result_file", None)
    try:
        result = handler(ns)
    except ConversionError as e:
        result = ConversionResult(status="Failed", reason=e.reason, message=str(e), exit_code=int(e.exit_code),
                                  seconds=time.perf_counter() - t0, converter_version=__version__)
        log.error("error: %s", e)
    except KeyboardInterrupt:
        message = "interrupted before the checkpoint was complete; nothing was written to --save-dir"
        result = ConversionResult(status="Failed", reason="Interrupted", message=message,
                                  exit_code=int(ExitCode.INTERRUPTED), converter_version=__version__)
        log.error("error: %s", message)
    except Exception as e:  # noqa: BLE001 - last resort: report, never hide
        traceback.print_exc()
        result = ConversionResult(status="Failed", reason="InternalError", message=f"{type(e).__name__}: {e}",
                                  exit_code=int(ExitCode.INTERNAL), converter_version=__version__)
        log.error("internal error (a bug: please report it with the traceback above)")
    _write_result(result_file, result)
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    _setup_logging(ns.log_format)
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _main(ns)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _main(ns: argparse.Namespace) -> int:
    from ms2mg_converter.cli import commands

    handlers: dict[str, Callable[[argparse.Namespace], ConversionResult]] = {
        "convert": commands.convert, "inspect": commands.inspect, "verify": commands.verify,
        "demo": lambda ns: commands.demo(ns, main)}
    if ns.command in ("convert", "inspect", "verify"):
        try:
            for note in reference_notes(ns):
                log.info("note: %s", note)
        except ConversionError as e:
            log.error("error: %s", e)
            _write_result(getattr(ns, "result_file", None), ConversionResult(
                status="Failed", reason=e.reason, message=str(e), exit_code=int(e.exit_code)))
            return int(e.exit_code)
    return _run(ns, handlers[ns.command])


def entry() -> None:
    """The `ms2mg` console script: `main`, then a quick exit.

    With torch loaded (verification), the interpreter's own shutdown takes ~0.35 s of module teardown
    after the work is done. Every file ms2mg writes is closed (and the checkpoint synced) before `main`
    returns, so the script flushes its streams and logging and ends the process with `os._exit`.
    """
    code = main()
    if "torch" not in sys.modules:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`| head`): nothing more to say there
            stream.flush()
    os._exit(code)


__all__ = ["entry", "main", "to_config"]
