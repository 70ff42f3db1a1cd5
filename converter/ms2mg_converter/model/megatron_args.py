"""The `args` namespace stored in every rank file.

Megatron's `load_args_from_checkpoint` / `check_checkpoint_args` and its checkpoint tools read these
(target-format.md §3.1, §6 and the appendix). The reference pipeline leaves out `group_query_attention`,
`untie_embeddings_and_output_weights`, `add_qkv_bias` and `kv_channels`, which silently turns GQA into
MHA, unties nothing and loses Qwen2-style biases; every one of them is written here.

The pipeline layout fields are the same for every output format (the legacy `torch` files depend on the
layout, `torch_dist` files do not, but their `args` do): `decoder_first/last_pipeline_num_layers`,
`num_layers_per_virtual_pipeline_stage` / `num_virtual_stages_per_pipeline_rank` as the user gave them, and
`virtual_pipeline_model_parallel_size` as Megatron-LM's `validate_args` derives it from them (core_r0.12.0).
Megatron's `load_args_from_checkpoint` (`--use-checkpoint-args`) restores only the virtual size and
`num_layers_per_virtual_pipeline_stage` of these, so uneven stages must be given again when training.
"""

from __future__ import annotations

from dataclasses import dataclass

from ms2mg_converter.config import CkptFormat, ConvertConfig, DType
from ms2mg_converter.model.arch import Architecture
from ms2mg_converter.model.mla import mla_args
from ms2mg_converter.model.moe import moe_args
from ms2mg_converter.pipeline import virtual_stages


@dataclass(frozen=True)
class TorchGlobal:
    """A module attribute of torch pickled by reference (e.g. `torch.bfloat16`) without importing torch."""

    module: str
    name: str


TORCH_DTYPES = {DType.BF16: "bfloat16", DType.FP16: "float16", DType.FP32: "float32"}


def megatron_args(arch: Architecture, cfg: ConvertConfig) -> dict[str, object]:
    """Field name -> plain value (or `TorchGlobal`), in a stable order."""
    rope = arch.position_embedding_type == "rope"
    return {
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "ffn_hidden_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_query_groups": arch.num_query_groups,
        "group_query_attention": arch.num_query_groups != arch.num_attention_heads,
        "kv_channels": arch.kv_channels,
        "seq_length": arch.seq_length,
        "max_position_embeddings": arch.max_position_embeddings,
        "position_embedding_type": str(arch.position_embedding_type),
        "add_position_embedding": True,
        "use_rotary_position_embeddings": rope,
        "rotary_base": int(arch.rotary_base) if arch.rotary_base.is_integer() else arch.rotary_base,
        "rotary_percent": arch.rotary_percent,
        "rotary_interleaved": arch.rotary_interleaved,
        "normalization": str(arch.normalization),
        "norm_epsilon": arch.norm_epsilon,
        "apply_layernorm_1p": False,
        "swiglu": arch.swiglu,
        "squared_relu": False,
        "add_bias_linear": arch.add_bias_linear,
        "add_qkv_bias": arch.add_qkv_bias or arch.add_bias_linear,
        "qk_layernorm": arch.qk_layernorm,
        **mla_args(arch.mla),
        "untie_embeddings_and_output_weights": arch.untie_embeddings_and_output_weights,
        "padded_vocab_size": arch.padded_vocab_size,
        "make_vocab_size_divisible_by": cfg.vocab.make_vocab_size_divisible_by,
        "vocab_size": arch.true_vocab_size,
        "tokenizer_type": cfg.tokenizer_type,
        "tensor_model_parallel_size": cfg.tensor_parallel,
        "pipeline_model_parallel_size": cfg.pipeline_parallel,
        **_pipeline_args(arch, cfg),
        **moe_args(arch.moe, cfg.tensor_parallel, cfg.moe.expert_parallel, cfg.moe.grouped_gemm),
        "apply_query_key_layer_scaling": False,
        "fp16": cfg.dtype is DType.FP16,
        "bf16": cfg.dtype is DType.BF16,
        "params_dtype": TorchGlobal("torch", TORCH_DTYPES[cfg.dtype]),
        "transformer_impl": str(cfg.transformer_impl),
        "ckpt_format": str(cfg.ckpt_format),
        "use_legacy_models": False,
        "iteration": 1,
        "consumed_train_samples": 0,
        "consumed_valid_samples": 0,
        **_dist_args(cfg),
    }


def _dist_args(cfg: ConvertConfig) -> dict[str, object]:
    """torch_dist: tell Megatron that no optimizer or RNG state was saved (torch-dist-format.md §5, §8.4)."""
    if cfg.ckpt_format is not CkptFormat.TORCH_DIST:
        return {}
    return {"no_save_optim": True, "no_save_rng": True}


def _pipeline_args(arch: Architecture, cfg: ConvertConfig) -> dict[str, object]:
    layout = cfg.pipeline_layout
    return {
        "virtual_pipeline_model_parallel_size": virtual_stages(arch.num_layers, cfg.pipeline_parallel, layout),
        "num_layers_per_virtual_pipeline_stage": layout.num_layers_per_virtual_pipeline_stage,
        "num_virtual_stages_per_pipeline_rank": layout.num_virtual_stages_per_pipeline_rank,
        "decoder_first_pipeline_num_layers": layout.decoder_first_pipeline_num_layers,
        "decoder_last_pipeline_num_layers": layout.decoder_last_pipeline_num_layers,
    }
