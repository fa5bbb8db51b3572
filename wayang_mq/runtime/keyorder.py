"""Order per partition key inside one worker: one delivery of a key at a time, in delivery order.

A shard queue (``x-single-active-consumer``) hands its deliveries, in queue order, to one
worker at a time; with a prefetch above 1 that worker holds several at once, and would run
two tasks of one key side by side if it started every delivery at once. :class:`KeyOrder`
chains the deliveries of each key: a delivery takes its place in its key's line the moment it
arrives (synchronously, so the line is the delivery order), waits for the one before it to be
settled, runs, and lets the next one go. Deliveries of other keys do not wait. A key's entry
is dropped as soon as its line is empty, so memory is bounded by the deliveries held (the
prefetch), not by the number of keys ever seen.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass(eq=False, slots=True)
class Place:
    """One delivery's place in its key's line."""

    key: str
    _before: asyncio.Future[None] | None
    _mine: asyncio.Future[None] = field(repr=False)

    async def wait(self) -> None:
        """Until every earlier delivery of the key is settled (or gave up its place)."""
        if self._before is not None and not self._before.done():
            # shielded: a cancelled waiter must not cancel the one it waits for
            await asyncio.shield(self._before)


class KeyOrder:
    """The lines of deliveries per key; ``take(key)`` on arrival, ``leave(place)`` when done."""

    def __init__(self) -> None:
        self._last: dict[str, Place] = {}  # the newest place of each key with a line

    def take(self, key: str) -> Place:
        """A place behind the key's latest delivery; call it in delivery order, before any
        ``await`` (a coroutine switch between arrival and ``take`` could reorder the line)."""
        before = self._last.get(key)
        place = Place(
            key, before._mine if before else None, asyncio.get_running_loop().create_future()
        )
        self._last[key] = place
        return place

    def leave(self, place: Place) -> None:
        """The delivery is settled (or will never run here): the next of its key may start."""
        if not place._mine.done():
            place._mine.set_result(None)
        if self._last.get(place.key) is place:
            del self._last[place.key]  # nobody behind it: the key's line is gone

    def __len__(self) -> int:
        """Keys with a line right now (for tests and metrics)."""
        return len(self._last)
