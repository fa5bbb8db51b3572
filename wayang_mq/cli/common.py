"""What several verbs share: running a daemon until a signal, a dispatcher from settings,
checking a capability argument."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from wayang_mq.config import Settings
from wayang_mq.core.errors import ConfigError

if TYPE_CHECKING:
    from wayang_mq.client.dispatcher import DispatcherConfig


async def run_until_signal(
    run: Callable[[], Any], stop: Callable[[], None], reload: Callable[[], Any] | None = None
) -> None:
    """Run a daemon; SIGTERM and SIGINT ask it to stop gracefully instead of killing it, and
    SIGHUP calls ``reload`` (the key ring: a removed key stops being trusted at once)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)
    await run()


def dispatcher_config(settings: Settings) -> DispatcherConfig:
    """A dispatcher on the configured broker, signing with the configured key."""
    from wayang_mq.client.dispatcher import DispatcherConfig
    from wayang_mq.config import broker_endpoint, keyring, signer, signer_scope

    key = signer(settings)
    scope = signer_scope(settings)
    return DispatcherConfig(
        amqp_url=broker_endpoint(settings).amqp_url,
        signer=key,
        results_keyring=keyring(settings),
        issuer=scope.identity if scope is not None else None,
        audience=settings.audience,
    )


def capability_arg(capability: str) -> str:
    from wayang_mq.core.names import valid_capability

    if not valid_capability(capability):
        raise ConfigError(
            f"{capability!r} is not a capability name", hint="e.g. demo.echo; see `dead list`"
        )
    return capability
