"""Observability: metrics, traces, log context and usage for billing (docs/observability.md).

Each daemon's Prometheus families (:mod:`.metrics`) and the HTTP endpoint serving them with
its liveness and readiness (:mod:`.http`); the worker's task metrics as a middleware layer
(:mod:`.worker`).
"""
