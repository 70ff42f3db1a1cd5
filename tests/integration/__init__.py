"""Integration tests against the local Kubernetes control plane (scripts/k8s/, docs/k8s-testing.md)."""
