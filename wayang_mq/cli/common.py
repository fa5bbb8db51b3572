"""What several verbs share: running a daemon until a signal, a dispatcher from settings,
checking a capability argument."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from wayang_mq.config import Settings
from wayang_mq.core.errors import ConfigError

if TYPE_CHECKING:
    from wayang_mq.client.dispatcher import DispatcherConfig

T = TypeVar("T")

#: ``asyncio`` runs the daemons on the standard event loop even when uvloop is installed
EVENT_LOOP_ENV = "WAYANG_EVENT_LOOP"


def run_daemon(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, on uvloop when it is installed (the ``fast`` extra) unless
    ``WAYANG_EVENT_LOOP=asyncio``: the same program, its loop's own overhead per callback,
    task and socket write cut (docs/performance.md)."""
    choice = os.environ.get(EVENT_LOOP_ENV, "").strip().lower()
    if choice not in ("", "uvloop", "asyncio"):
        main.close()  # never run: no "never awaited" warning on the way out
        raise ConfigError(f"{EVENT_LOOP_ENV}={choice!r}: use uvloop or asyncio")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                main.close()
                raise ConfigError(
                    f"{EVENT_LOOP_ENV}=uvloop but uvloop is not installed",
                    hint="pip install 'wayang-mq[fast]'",
                ) from None
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
    return asyncio.run(main)


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
    from wayang_mq.client.dispatcher import CLI_REPLY_QUEUE_EXPIRES_S, DispatcherConfig
    from wayang_mq.config import broker_endpoint, keyring, signer, signer_scope

    endpoint = broker_endpoint(settings, "dispatcher")
    scope = signer_scope(settings, "dispatcher")
    return DispatcherConfig(
        amqp_url=endpoint.amqp_url,
        signer=signer(settings, "dispatcher"),
        results_keyring=keyring(settings),
        dispatcher_id=process_id(endpoint.username, "d"),
        issuer=scope.identity if scope is not None else None,
        audience=settings.audience,
        reply_queue_expires_s=CLI_REPLY_QUEUE_EXPIRES_S,
    )


def process_id(account: str, fallback_prefix: str) -> str:
    """This process's id under a broker account: ``<account>--<instance>``, which the
    account's permissions allow (docs/security.md, section 3); a user name that cannot start
    an id (``guest@example``) gets the old ``<prefix>-…`` default."""
    from wayang_mq.core.names import valid_word
    from wayang_mq.security.accounts import INSTANCE_SEPARATOR, instance_id

    if valid_word(account) and INSTANCE_SEPARATOR not in account:
        return instance_id(account)
    from wayang_mq.core.model import new_id

    return f"{fallback_prefix}-{new_id()[:8]}"


def capability_arg(capability: str) -> str:
    from wayang_mq.core.names import valid_capability

    if not valid_capability(capability):
        raise ConfigError(
            f"{capability!r} is not a capability name", hint="e.g. demo.echo; see `dead list`"
        )
    return capability


def add_metrics_options(parser: Any) -> None:
    """``--metrics-port`` and ``--metrics-host`` of a daemon verb (docs/observability.md)."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="count, and serve Prometheus /metrics, /healthz and /readyz on this port "
        "(default: off)",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="H",
        help="the address --metrics-port listens on (default 127.0.0.1; 0.0.0.0: every one)",
    )
