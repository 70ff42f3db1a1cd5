"""ms2mg converter: MindFormers safetensors -> Megatron-LM checkpoints."""

__version__ = "0.1.0"
