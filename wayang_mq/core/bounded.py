"""A bounded map that forgets its oldest entries: every "what did I see recently" in the fabric
(recent results, handled dead letters, cancels, results handed out) is one of these."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
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
