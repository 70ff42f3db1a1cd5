"""Demo: the built-in sample (a small MindFormers checkpoint made from a seed) and `ms2mg demo`.

Public names: `SampleSpec`, `build_sample`, `logical_weights`, `mindformers_tensors` (in `demo.sample`),
`run_demo` (in `demo.demo`).
"""
