"""`ms2mg-operator` / `python -m ms2mg_operator`: `kopf run` with the operator's settings.

With no arguments it runs standalone against the cluster of the current kubeconfig context (or the
in-cluster configuration), watching the namespaces of `MS2MG_WATCH_NAMESPACES` (default: all), with the
liveness endpoint on `MS2MG_LIVENESS_PORT` and the log format of `MS2MG_LOG_FORMAT`. Extra arguments are
passed to `kopf run` (e.g. `--verbose`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ms2mg_operator.config import OperatorSettings

KOPF_LOG_FORMATS = {"plain": "full", "json": "json"}


def kopf_arguments(settings: OperatorSettings, extra: Sequence[str] = ()) -> list[str]:
    """The `kopf run ...` arguments for these settings."""
    args = ["run", "--standalone", "--module", "ms2mg_operator.handlers",
            "--log-format", KOPF_LOG_FORMATS[settings.log_format]]
    if settings.liveness_port:
        args.append(f"--liveness=http://0.0.0.0:{settings.liveness_port}/healthz")
    if settings.all_namespaces:
        args.append("--all-namespaces")
    else:
        for namespace in settings.watch_namespaces:
            args += ["--namespace", namespace]
    return [*args, *extra]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ms2mg-operator` console script."""
    import kopf.cli  # deferred: keeps `--help` of this module cheap and the settings error first

    settings = OperatorSettings()
    args = kopf_arguments(settings, sys.argv[1:] if argv is None else argv)
    kopf.cli.main.main(args=args, prog_name="ms2mg-operator")  # click exits with kopf's status
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
