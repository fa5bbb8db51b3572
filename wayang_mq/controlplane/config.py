"""How a control plane runs (:class:`ControlPlaneConfig`), and what its parts (claims,
placement) need of the daemon that hosts them (:class:`Host`): so that those parts depend on
this small module, not on the daemon that imports them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from wayang_mq.amqp.daemon import Handler
from wayang_mq.amqp.publisher import ConfirmedPublisher
from wayang_mq.controlplane.supervision import SupervisionConfig
from wayang_mq.core import names
from wayang_mq.core.errors import ConfigError
from wayang_mq.core.model import DEFAULT_AUDIENCE
from wayang_mq.core.signing import KeyRing, Signer
from wayang_mq.core.wire import DEFAULT_MAX_BODY_BYTES


@dataclass(frozen=True)
class ControlPlaneConfig:
    """How one control plane runs; built once by the CLI or a test."""

    amqp_url: str = field(repr=False)
    database_url: str = field(repr=False)
    keyring: KeyRing  # what verifies here is what the fabric's receivers would act on
    signer: Signer | None = None  # the control plane's own key (re-dispatches, answers)
    control_plane_id: str = field(default_factory=lambda: names.default_id("control-plane"))
    prefetch: int = 256  # deliveries held: what one transaction may write at most
    batch: int = 128  # facts written per transaction
    grace_s: float = 10.0
    audience: str = DEFAULT_AUDIENCE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    health_port: int | None = None
    metrics_port: int | None = None  # count, and serve /metrics on this port (0: any)
    metrics_host: str = "127.0.0.1"
    audit_interval_s: float = 60.0  # with metrics: how often the audit gauges are read (0: never)
    retry_max_s: float = 5.0  # longest wait between database reconnects
    # lost executors and their tasks' re-dispatch (None: this instance only records)
    supervision: SupervisionConfig | None = field(default_factory=SupervisionConfig)

    def __post_init__(self) -> None:
        if self.prefetch < 1 or self.batch < 1:
            raise ConfigError("prefetch and batch must be at least 1")
        if self.audit_interval_s < 0:
            raise ConfigError("the audit interval must be 0 (off) or more seconds")
        if not names.valid_word(self.control_plane_id):
            raise ConfigError(
                f"control plane id {self.control_plane_id!r} must be lowercase letters, "
                "digits, '-' or '_'"
            )


class Host(Protocol):
    """What the control plane's parts use of the daemon: its config, its confirmed
    publisher, and consuming a queue of the topology."""

    config: ControlPlaneConfig

    @property
    def publisher(self) -> ConfirmedPublisher: ...

    async def consume(self, queue_name: str, handle: Handler, *, hint: str) -> None: ...
