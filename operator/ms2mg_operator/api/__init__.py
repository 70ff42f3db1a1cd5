"""Versioned API types of the `CheckpointConversion` resource (pydantic, no kopf, no Kubernetes client)."""
