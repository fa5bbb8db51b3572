"""The Celery baseline: a trivial echo task on a quorum queue, acks_late, ``rpc://`` results.

Started as ``celery -A bench.celery_app worker --pool threads ...`` by ``bench/run.py``; the
broker URL comes from Celery's own ``CELERY_BROKER_URL`` variable. The guarantees are set to
match wayang-mq's: persistent tasks and results, publisher confirms on every publish (the
client's task and the worker's result; Celery's default is no confirms), the ack after the
result is published (``acks_late``), and a redelivery on a lost worker.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.entity import Queue

QUEUE = "bench.celery"
TASK_NAME = "bench.echo"

app = Celery("bench", backend="rpc://")
app.conf.update(
    task_default_queue=QUEUE,
    task_queues=[
        # The same limits the wayang-mq topology puts on a capability queue, as arguments.
        Queue(  # type: ignore[no-untyped-call]
            QUEUE,
            queue_arguments={
                "x-queue-type": "quorum",
                "x-max-length": 100_000,
                "x-overflow": "reject-publish",
                "x-delivery-limit": 5,
            },
        )
    ],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,  # prefetch = concurrency, as wayang-mq's default
    task_serializer="json",
    result_serializer="json",
    result_persistent=True,  # delivery_mode=2 for results, as wayang-mq's
    broker_transport_options={"confirm_publish": True},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    task_send_sent_event=False,
)


@app.task(name=TASK_NAME)  # type: ignore[untyped-decorator]
def echo(payload: dict[str, Any]) -> dict[str, Any]:
    """Return the input unchanged."""
    return payload
