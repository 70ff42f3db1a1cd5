"""Real MindFormers naming families (issue 10): fixtures built from an independent HF-style truth, and tests.

Each `fam_*.py` module writes a small checkpoint with exactly the names, dtypes and fused layouts one
MindFormers model family writes (the docstring names the MindFormers files and versions it follows),
`expected.py` builds the Megatron-LM output the truth must become (written from
shared/docs/target-format.md, sharing no code with `ms2mg_converter`), and the tests run the real CLI.
"""
