"""Model: the architecture of the source model, inferred from tensor shapes and checked against the flags
and the MindFormers YAML (`infer_architecture`), and the Megatron `args` it implies (`megatron_args`).

Public names: `Architecture`, `infer_architecture`, `megatron_args`.
"""

from ms2mg_converter.model.arch import Architecture, infer_architecture
from ms2mg_converter.model.megatron_args import megatron_args

__all__ = ["Architecture", "infer_architecture", "megatron_args"]
