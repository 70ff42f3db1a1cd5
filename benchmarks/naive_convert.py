#!/usr/bin/env python3
"""The naive baseline: load the whole safetensors file, cast every tensor to bf16, one torch.save, fsync.

    python benchmarks/naive_convert.py SOURCE.safetensors OUT.pt
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import load_file


def main() -> None:
    source, out = sys.argv[1], sys.argv[2]
    state = {k: v.to(torch.bfloat16) for k, v in load_file(source).items()}
    with open(out, "wb") as f:
        torch.save({"model": state}, f)
        f.flush()
        os.fsync(f.fileno())


if __name__ == "__main__":
    main()
