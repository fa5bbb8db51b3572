"""A daemon's health, as its probes are told it (:mod:`wayang_mq.observability.http` serves it;
:class:`wayang_mq.amqp.daemon.Daemon` reports it): plain values, no AMQP."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class State(StrEnum):
    """Where a daemon is in its life."""

    STARTING = "starting"
    READY = "ready"  # consuming
    DRAINING = "draining"  # stopped consuming, finishing what it holds
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Health:
    """A daemon's answer to a health probe."""

    daemon: str
    id: str
    state: State
    connected: bool
    consumers: int
    in_flight: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Consuming on a live connection."""
        return self.state is State.READY and self.connected
