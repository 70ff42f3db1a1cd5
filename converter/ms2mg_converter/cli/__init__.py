"""CLI: the `ms2mg` command (`main`, `entry`): flags -> `ConvertConfig`, the subcommands convert, inspect,
verify and demo, progress output, exit codes and the result file.

Public names (in `cli.main`): `main`, `entry`.
"""
