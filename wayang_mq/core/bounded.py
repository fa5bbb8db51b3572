"""A bounded map that forgets its oldest entries: every "what did I see recently" in the fabric
(recent results, handled dead letters, cancels, results handed out) is one of these."""

from __future__ import annotations

import os
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from hashlib import blake2b
from typing import Generic, TypeVar

V = TypeVar("V")


class LastSeen(Generic[V]):
    """The last ``limit`` entries by key, and at most ``budget`` units of weight (bytes, say).

    An entry heavier than an eighth of the budget is not kept: one huge value must not flush
    everything else out.
    """

    def __init__(self, limit: int, budget: int | None = None) -> None:
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._limit = limit
        self._budget = budget
        self._weight = 0

    def get(self, key: str) -> V | None:
        """The value kept for ``key``, if any."""
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def put(self, key: str, value: V, weight: int = 0) -> bool:
        """Keep ``value`` as the newest entry; False when it is too heavy to keep."""
        if self._budget is not None and weight > self._budget // 8:
            return False
        previous = self._entries.pop(key, None)
        if previous is not None:
            self._weight -= previous[1]
        self._entries[key] = (value, weight)
        self._weight += weight
        while len(self._entries) > self._limit or (
            self._budget is not None and self._weight > self._budget
        ):
            _, (_, dropped) = self._entries.popitem(last=False)
            self._weight -= dropped
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


class LastSeenDigests:
    """:class:`LastSeen` for ``str`` keys and ``int`` values (signed 64-bit), in fixed memory.

    A key is kept as its 128-bit keyed BLAKE2b digest (the key is random per process, so no
    one can choose keys that collide); two keys agreeing on all 128 bits would be taken for
    one, a chance of about ``limit / 2**128`` per lookup (3e-34 at 100,000 entries): never.
    Everything is allocated at construction, 32 bytes an entry plus a hash index of 8 to 16
    bytes an entry (4.2 MB for 100,000), so memory does not grow as it fills, where a dict of
    100,000 such strings grows by about 28 MB. Entries are a doubly linked list in arrays,
    oldest first (a key put again moves to the newest, as in :class:`LastSeen`), indexed by an
    open-addressing table with linear probing and backward-shift deletion (no tombstones).
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("limit must be at least 0")
        self._limit = limit
        self._salt = os.urandom(16)
        size = max(1, limit)
        self._hi = array("Q", bytes(8 * size))  # per slot: the digest's two halves
        self._lo = array("Q", bytes(8 * size))
        self._values = array("q", bytes(8 * size))
        self._newer = array("i", [-1]) * size  # the list of slots, oldest first; -1: none
        self._older = array("i", [-1]) * size
        self._oldest = self._newest = -1
        capacity = 1 << (2 * size - 1).bit_length()  # buckets: the index is at most half full
        self._mask = capacity - 1
        self._index = array("i", [-1]) * capacity  # per bucket: a slot; -1: empty
        self._count = 0  # slots 0 .. count-1 are in use (a forgotten one is reused at once)
        self._last: tuple[str, tuple[int, int]] = ("", (0, 0))  # a get then a put: hashed once

    def _digest(self, key: str) -> tuple[int, int]:
        if self._last[0] == key:
            return self._last[1]
        digest = blake2b(key.encode(), digest_size=16, key=self._salt).digest()
        halves = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")
        self._last = (key, halves)
        return halves

    def _find(self, hi: int, lo: int) -> int:
        """The bucket holding the digest, or the empty bucket where it would go (~bucket)."""
        index, mask = self._index, self._mask
        bucket = lo & mask
        while True:
            slot = index[bucket]
            if slot < 0:
                return ~bucket
            if self._lo[slot] == lo and self._hi[slot] == hi:
                return bucket
            bucket = (bucket + 1) & mask

    def get(self, key: str) -> int | None:
        """The value kept for ``key``, if any."""
        bucket = self._find(*self._digest(key))
        return None if bucket < 0 else self._values[self._index[bucket]]

    def put(self, key: str, value: int) -> None:
        """Keep ``value`` as the newest entry, forgetting the oldest beyond the limit."""
        if self._limit == 0:
            return
        hi, lo = self._digest(key)
        bucket = self._find(hi, lo)
        if bucket >= 0:  # kept already: a new value, and it is the newest now
            slot = self._index[bucket]
            self._unlink(slot)
        else:
            if self._count == self._limit:
                slot = self._oldest
                self._forget(slot)
                bucket = self._find(hi, lo)  # the deletion may have moved the empty bucket
            else:
                slot = self._count
            self._hi[slot], self._lo[slot] = hi, lo
            self._index[~bucket] = slot
            self._count += 1
        self._values[slot] = value
        self._link_newest(slot)

    def _link_newest(self, slot: int) -> None:
        self._older[slot], self._newer[slot] = self._newest, -1
        if self._newest >= 0:
            self._newer[self._newest] = slot
        else:
            self._oldest = slot
        self._newest = slot

    def _unlink(self, slot: int) -> None:
        older, newer = self._older[slot], self._newer[slot]
        if older >= 0:
            self._newer[older] = newer
        else:
            self._oldest = newer
        if newer >= 0:
            self._older[newer] = older
        else:
            self._newest = older

    def _forget(self, slot: int) -> None:
        """Drop the entry in ``slot``: out of the list, and out of the index by shifting back
        the entries after it in its probe run (so no lookup meets a hole before its key)."""
        self._unlink(slot)
        index, mask = self._index, self._mask
        hole = self._find(self._hi[slot], self._lo[slot])
        bucket = hole
        while True:
            bucket = (bucket + 1) & mask
            moved = index[bucket]
            if moved < 0:
                break
            home = self._lo[moved] & mask
            # the entry may fill the hole unless its home lies cyclically in (hole, bucket]
            if (bucket - home) & mask >= (bucket - hole) & mask:
                index[hole] = moved
                hole = bucket
        index[hole] = -1
        self._count -= 1

    def __len__(self) -> int:
        return self._count
