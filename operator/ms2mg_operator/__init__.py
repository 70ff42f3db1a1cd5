"""ms2mg operator: runs CheckpointConversion resources as Kubernetes Jobs."""

__version__ = "0.1.0"
