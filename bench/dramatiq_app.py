"""The Dramatiq baseline: an echo actor whose reply is a Dramatiq message on a reply queue.

Started as ``python -m dramatiq bench.dramatiq_app --processes P --threads T --queues
bench.dramatiq`` by ``bench/run.py``; the broker URL comes from ``BENCH_AMQP_URL`` (so the
password never shows in ``ps``) and ``BENCH_DRAMATIQ_CONFIRM=1`` turns on
``RabbitmqBroker(confirm_delivery=True)``: every send of the worker (the reply) then waits for
the broker's confirm. The confirmed variant has queues of its own (``bench.dramatiq-confirmed``
and its reply queue), so both can run in one bench side by side.

Everything else is Dramatiq's default: its default middleware (AgeLimit, TimeLimit,
ShutdownNotifications, Callbacks, Pipelines, Retries; Prometheus is not among them in
Dramatiq 2, so no port is opened), persistent messages (Dramatiq always publishes
``delivery_mode=2``), the ack after the actor returns, its own queue declarations (durable
classic queues with a dead-letter queue ``.XQ`` and a delay queue ``.DQ``) and its prefetch
(2 × threads per worker process).

The reply goes out through the same broker (``reply.send``): a message for the ``bench.reply``
actor, which no worker runs (``--queues`` keeps the workers off its queue); the bench client
consumes that queue itself.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

ECHO_ACTOR = "bench.echo"
REPLY_ACTOR = "bench.reply"


def queues(*, confirm: bool) -> tuple[str, str]:
    """The task queue and the reply queue of one variant."""
    task = "bench.dramatiq-confirmed" if confirm else "bench.dramatiq"
    return task, f"{task}.reply"


def make_broker(url: str, *, confirm: bool) -> RabbitmqBroker:
    """A broker with Dramatiq's default middleware; ``confirm``: every send confirmed."""
    return RabbitmqBroker(url=url, confirm_delivery=confirm)


# No connection is made here (pika connects on first use), so the bench process can import
# the names above without a broker URL.
CONFIRM = os.environ.get("BENCH_DRAMATIQ_CONFIRM") == "1"
QUEUE, REPLY_QUEUE = queues(confirm=CONFIRM)
broker = make_broker(
    os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@localhost:5672/%2F"), confirm=CONFIRM
)
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name=REPLY_ACTOR, queue_name=REPLY_QUEUE)
def reply(task_id: str, output: dict[str, Any]) -> None:
    """Never run: its queue is read by the bench client, not by a worker."""


@dramatiq.actor(actor_name=ECHO_ACTOR, queue_name=QUEUE)
def echo(task_id: str, payload: dict[str, Any]) -> None:
    """Send the input back, naming the task it answers (the client's message id)."""
    reply.send(task_id, payload)


def declare_queues(url: str) -> None:
    """Declare both variants' queues (and their .DQ/.XQ) as Dramatiq does, and empty them."""
    own = make_broker(url, confirm=False)
    try:
        for name in (*queues(confirm=False), *queues(confirm=True)):
            own.declare_queue(name, ensure=True)
            own.flush(name)
    finally:
        own.close()
