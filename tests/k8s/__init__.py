"""Helpers for tests against the local Kubernetes control plane built by scripts/k8s/ (see docs/k8s-testing.md)."""
