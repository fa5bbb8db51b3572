"""Observability: what the fabric tells the people who run it (docs/observability.md).

Each daemon's Prometheus families (:mod:`.metrics`) and the HTTP endpoint serving them with
its liveness and readiness (:mod:`.http`).
"""
