"""Observability: metrics, traces, log context and usage for billing (docs/observability.md)."""
