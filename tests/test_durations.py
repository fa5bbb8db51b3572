"""Durations: seconds or timedelta in, the wire's milliseconds out, in one place (no broker)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from wayang_mq.client.dispatcher import Dispatcher, DispatcherConfig
from wayang_mq.core.durations import to_ms
from wayang_mq.core.signing import KeyRing, Signer


def test_seconds_and_timedeltas_become_whole_milliseconds() -> None:
    assert to_ms(2) == 2000
    assert to_ms(0.0015) == 2  # rounded, not truncated
    assert to_ms(timedelta(minutes=1, milliseconds=5)) == 60_005


@pytest.mark.parametrize("bad", [-1, float("inf"), float("nan"), timedelta(seconds=-1)])
def test_a_negative_or_endless_duration_is_refused(bad: float | timedelta) -> None:
    with pytest.raises(ValueError, match="duration"):
        to_ms(bad)


def test_a_dispatchers_task_carries_every_option_converted_once() -> None:
    # Given a dispatcher (not started: building a task needs no broker)
    signer = Signer.generate()
    config = DispatcherConfig(
        amqp_url="amqp://x/", signer=signer, results_keyring=KeyRing.of([signer.public_key])
    )
    dispatcher = Dispatcher(config)
    # When a task is built with durations in seconds and as a timedelta
    task = dispatcher.task(
        "demo.echo",
        {"x": 1},
        queue_timeout_s=timedelta(seconds=90),
        timeout_s=2.5,
        heartbeat_timeout_s=3,
        node_id="node-7",
        partition_key="customer-1",
    )
    # Then the wire fields hold milliseconds, and the task owns its queue window
    assert (task.timeout_ms, task.heartbeat_timeout_ms) == (2500, 3000)
    assert task.queue_window_ms == 90_000
    assert (task.node_id, task.partition_key) == ("node-7", "customer-1")
    assert task.reply_to == dispatcher.reply_to and task.issuer == dispatcher.dispatcher_id
    # and a task left to the defaults waits 60 s for an executor
    assert dispatcher.task("demo.echo").queue_window_ms == 60_000
