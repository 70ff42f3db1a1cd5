"""Run: one conversion end to end: the format's writer into a staging directory, verification against the
source, the manifest, and the atomic commit to --save-dir (`run_plan`).

Public names: `run_plan`, `RunStats`.
"""

from ms2mg_converter.run.execute import RunStats, run_plan

__all__ = ["RunStats", "run_plan"]
