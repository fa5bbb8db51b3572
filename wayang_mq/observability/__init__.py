"""Observability: metrics, traces and usage, beside the structured logs of core.logs."""
