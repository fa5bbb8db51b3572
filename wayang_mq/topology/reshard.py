"""Change a sharded capability's shard count without losing a queued task.

``topology apply`` refuses a changed ``shards`` (it would add or strand shard queues under
tasks already queued, and move keys between shards mid-flight). ``reshard`` does it in steps
that each keep every task in some queue, so a crash at any point loses nothing and running it
again finishes the job:

1. refuse while any shard queue has a consumer (stop the capability's workers first);
2. declare the holding queue ``wayang.reshard.<cap>`` and bind it to ``wayang.shard.<cap>``,
   then unbind the shard queues: from here on new tasks wait in the holding queue;
3. move every shard queue's messages into the holding queue, in queue order, then delete the
   emptied shard queue;
4. declare the new shard queues (single active consumer) and bind them, in number order;
5. unbind the holding queue and publish its messages to ``wayang.shard.<cap>``, which hashes
   each onto its new shard by its ``x-partition-key``; then delete the holding queue.

A move is: publish a copy (body, headers and properties as they were; the signature is over
the body), wait for the broker's confirm, then ack the original. A crash between the two
leaves both: the task runs twice at worst, and the worker's duplicate handling (recent
results, ``--claims``) answers the copy. Two things cannot be kept: the broker's own
``x-delivery-count`` header (the copy starts afresh) and the AMQP ``user_id`` of another
account (the broker accepts only the publishing connection's own user).

Order per key holds across a reshard for the tasks queued before it, when no task of the
capability is submitted while it runs (pause the dispatchers): a key's tasks move from one
shard queue, in order, through the holding queue, in order, onto one new shard. A task
submitted during steps 2-5 is queued behind, or (in step 5) ahead of, earlier tasks of its key.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from wayang_mq.amqp.management import ManagementClient
from wayang_mq.amqp.publisher import ConfirmedPublisher
from wayang_mq.core import names
from wayang_mq.core.errors import TopologyError
from wayang_mq.topology.apply import connect_once
from wayang_mq.topology.spec import QUORUM, SHARD_QUEUE, SHARD_WEIGHT, Capability, Topology

#: headers the broker owns: a moved copy must not carry the old count
_BROKER_HEADERS: Final = ("x-delivery-count",)

Progress = Callable[[str], None]

#: no delivery for this long: check whether the queue is empty
_QUIET_S: Final = 0.5


@dataclass(frozen=True, slots=True)
class ReshardReport:
    """What a reshard did."""

    capability: str
    before: int  # shard queues found on the broker
    after: int
    moved: int  # messages moved (each twice: into the holding queue, and out of it)

    def line(self) -> str:
        """One line for the CLI."""
        return (
            f"{self.capability}: {self.before} -> {self.after} shards, "
            f"{self.moved} queued tasks moved"
        )


async def reshard(
    topology: Topology,
    capability_name: str,
    to: int,
    amqp_url: str,
    management: ManagementClient,
    progress: Progress = lambda _: None,
) -> ReshardReport:
    """Rebuild ``capability_name``'s shard queues as ``to`` queues, moving what is queued."""
    capability = _sharded(topology, capability_name, to)
    queues = await asyncio.to_thread(_queue_arguments, management)
    before = len(_present_shards(capability.name, queues))
    holding = names.reshard_queue(capability.name)
    exchange = names.shard_exchange(capability.name)
    if names.shard_exchange(capability.name) not in await asyncio.to_thread(_exchanges, management):
        raise TopologyError(
            f"exchange {exchange} does not exist",
            hint="run `wayang-mq topology apply` first (it declares the sharded capability)",
        )
    if before == to and holding not in queues and _all_single_active(capability, before, queues):
        progress(f"{capability.name} already has {to} single-active-consumer shard queues")
        return ReshardReport(capability.name, before, to, 0)
    await asyncio.to_thread(_refuse_consumers, management, _present_shards(capability.name, queues))
    connection = await connect_once(amqp_url)
    try:
        publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        publisher = ConfirmedPublisher(publish_channel)
        channel = await connection.channel()
        move = _Mover(channel, publisher, progress)
        old = _present_shards(capability.name, queues)
        # 2. new tasks wait in the holding queue from now on
        hold = await channel.declare_queue(holding, durable=True, arguments=dict(QUORUM))
        await hold.bind(exchange, SHARD_WEIGHT)
        for name in old:
            await (await channel.get_queue(name, ensure=False)).unbind(exchange, _weight(name))
        progress(f"new {capability.name} tasks wait in {holding}")
        # 3. every old shard's tasks into the holding queue, in queue order
        moved = 0
        for name in old:
            moved += await move.drain(name, "", holding)
            await move.delete_empty(name)
        # 4. the new layout, bound in number order (the hash exchange numbers its buckets so)
        for name in capability.task_queues:
            queue = await channel.declare_queue(name, durable=True, arguments=dict(SHARD_QUEUE))
            await queue.bind(exchange, SHARD_WEIGHT)
            progress(f"declared {name}")
        # 5. out of the holding queue through the hash exchange onto the new shards
        await hold.unbind(exchange, SHARD_WEIGHT)
        moved += await move.drain(holding, exchange, "")
        await move.delete_empty(holding)
    finally:
        await connection.close()
    return ReshardReport(capability.name, before, to, moved)


def _sharded(topology: Topology, name: str, to: int) -> Capability:
    """The capability, sharded, and with the file saying ``shards = to`` already (so that a
    later ``topology apply`` agrees with what the reshard built)."""
    if to < 1:
        raise TopologyError("--to must be at least 1")
    try:
        capability = topology.capability(name)
    except KeyError:
        raise TopologyError(
            f"the topology file does not list capability {name}",
            hint=f'add [capabilities."{name}"] with shards = {to}',
        ) from None
    if capability.shards != to:
        now = "no shards" if capability.shards is None else f"shards = {capability.shards}"
        raise TopologyError(
            f"the topology file says {now} for {name}, not {to}",
            hint=f'set shards = {to} under [capabilities."{name}"] first (the file is what '
            "`topology apply` keeps), then run the reshard",
        )
    return capability


def _queue_arguments(management: ManagementClient) -> dict[str, Mapping[str, Any]]:
    return {q["name"]: q.get("arguments") or {} for q in management.list_queues()}


def _exchanges(management: ManagementClient) -> set[str]:
    return {e["name"] for e in management.list_exchanges()}


def _all_single_active(
    capability: Capability, count: int, queues: Mapping[str, Mapping[str, Any]]
) -> bool:
    shard_queues = [names.task_queue(capability.name, n) for n in range(count)]
    return all(queues[q].get("x-single-active-consumer") for q in shard_queues)


def _present_shards(capability: str, queues: Mapping[str, Any]) -> list[str]:
    """Every shard queue of ``capability`` on the broker, by number, gaps included (a reshard
    that stopped midway may have deleted some)."""
    pattern = re.compile(re.escape(names.task_queue(capability)) + r"\.(\d+)$")
    numbered = [(int(m[1]), name) for name in queues if (m := pattern.match(name))]
    return [name for _, name in sorted(numbered)]


def _refuse_consumers(management: ManagementClient, shard_queues: list[str]) -> None:
    """A worker consuming a shard queue would race the move: stop the workers first."""
    for name in shard_queues:
        capability = name.removeprefix("wayang.task.").rsplit(".", 1)[0]
        queue = management.get_queue(name) or {}
        consumers = int(queue.get("consumers") or 0)
        if consumers:
            raise TopologyError(
                f"{name} has {consumers} consumer(s)",
                hint=f"stop the workers of {capability} first (they would take tasks "
                "while they are moved); pause its dispatchers too to keep order per key",
            )


def _weight(_queue: str) -> str:
    # every shard queue is bound with the same weight (SHARD_WEIGHT)
    return SHARD_WEIGHT


class _Mover:
    """Moves a queue's messages one by one: publish a copy, confirmed, then ack."""

    def __init__(
        self,
        channel: AbstractChannel,
        publisher: ConfirmedPublisher,
        progress: Progress,
    ) -> None:
        self._channel = channel
        self._publisher = publisher
        self._progress = progress

    async def drain(self, source: str, exchange: str, routing_key: str) -> int:
        """Move everything in ``source`` until it is empty; how many were moved. A consumer,
        not basic.get: quorum queues with single active consumer refuse basic.get."""
        queue = await self._channel.get_queue(source, ensure=False)
        arrived: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        tag = await queue.consume(arrived.put)
        moved = 0
        try:
            while True:
                try:
                    message = await asyncio.wait_for(arrived.get(), _QUIET_S)
                except TimeoutError:
                    if await self._ready(source) == 0 and arrived.empty():
                        break
                    continue
                await self._publisher.publish(
                    exchange, routing_key, self._copy(message), mandatory=True
                )
                await message.ack()  # only once the copy is confirmed
                moved += 1
                if moved % 1000 == 0:
                    self._progress(f"{source}: {moved} moved")
        finally:
            await queue.cancel(tag)
        self._progress(f"{source}: {moved} moved to {exchange or routing_key}")
        return moved

    async def delete_empty(self, name: str) -> None:
        """Delete a drained, unbound queue. Quorum queues refuse ``if_empty``: the count the
        delete reports is checked instead (only a publish to the queue by name, which nothing
        in the fabric does, could have put a message there since the drain)."""
        deleted = await self._channel.queue_delete(name)
        if deleted.message_count:
            raise TopologyError(
                f"{name} received {deleted.message_count} message(s) after it was drained "
                "and unbound, and they were deleted with it",
                hint="something publishes to it by name through the default exchange: stop it",
            )
        self._progress(f"deleted {name}")

    async def _ready(self, name: str) -> int:
        declared = await self._channel.declare_queue(name, passive=True)
        return declared.declaration_result.message_count or 0

    def _copy(self, message: AbstractIncomingMessage) -> aio_pika.Message:
        headers = {k: v for k, v in (message.headers or {}).items() if k not in _BROKER_HEADERS}
        return aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            delivery_mode=message.delivery_mode,
            priority=message.priority,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            expiration=message.expiration,
            message_id=message.message_id,
            timestamp=message.timestamp,
            type=message.type,
            user_id=None,  # the publisher sets its connection's own user (the broker's rule)
            app_id=message.app_id,
        )
