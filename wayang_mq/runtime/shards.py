"""Which shard queues of a sharded capability one worker consumes (``--shards``).

Shards are spread over machines by giving each worker its own ``--shards``; several workers
may list the same shard: each shard queue has a single active consumer (the first to register)
and the others stand by, taking over in order when it goes (docs/sharding.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

from wayang_mq.core.errors import ConfigError

#: the key of a selection that applies to every sharded capability the worker serves
EVERY: Final = ""

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_HINT: Final = "e.g. --shards 0-3, --shards 0,2 or --shards db.query=0-1 (repeatable)"


def parse_shards(flags: Iterable[str]) -> dict[str, frozenset[int]]:
    """``["0-1", "db.query=2,3"]`` → ``{"": {0, 1}, "db.query": {2, 3}}``; ConfigError if
    a flag is not a list of shard numbers and ranges, or names a capability twice."""
    out: dict[str, frozenset[int]] = {}
    for flag in flags:
        capability, sep, numbers = flag.rpartition("=")
        capability = capability.strip() if sep else EVERY
        if capability in out:
            which = capability or "every capability"
            raise ConfigError(f"--shards names {which} twice", hint=_HINT)
        out[capability] = _numbers(flag, numbers)
    return out


def _numbers(flag: str, text: str) -> frozenset[int]:
    chosen: set[int] = set()
    for part in text.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise ConfigError(f"--shards {flag!r}: {part.strip()!r} is not N or N-M", hint=_HINT)
        low, high = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if high < low:
            raise ConfigError(f"--shards {flag!r}: the range {low}-{high} is empty", hint=_HINT)
        chosen.update(range(low, high + 1))
    return frozenset(chosen)


def check_capabilities(selection: Mapping[str, frozenset[int]], served: Iterable[str]) -> None:
    """A ``--shards CAP=...`` for a capability the worker does not serve is a mistake."""
    unknown = sorted(set(selection) - {EVERY} - set(served))
    if unknown:
        raise ConfigError(
            f"--shards names {unknown[0]!r}, which none of this worker's executors serves",
            hint="name a capability the worker serves, or leave CAP= out for all of them",
        )


def choose(capability: str, count: int, selection: Mapping[str, frozenset[int]]) -> list[int]:
    """The shard numbers to consume of ``capability``, which has ``count`` shards on the
    broker: all of them by default. ConfigError for a number the broker does not have."""
    chosen = selection.get(capability, selection.get(EVERY))
    if chosen is None:
        return list(range(count))
    missing = sorted(n for n in chosen if n >= count)
    if missing:
        raise ConfigError(
            f"--shards: capability {capability} has {count} shard queues on the broker "
            f"(0-{count - 1}); there is no shard {missing[0]}",
            hint="pick shards the broker has (`wayang-mq topology reshard` changes the count)",
        )
    return sorted(chosen)


def unsharded_selection(capability: str, selection: Mapping[str, frozenset[int]]) -> None:
    """``--shards CAP=...`` for a capability with one queue is refused (a plain ``--shards``
    does not apply to unsharded capabilities and is ignored for them)."""
    if capability in selection:
        raise ConfigError(
            f"--shards names {capability}, which is not sharded on the broker",
            hint="set shards = N for it in the topology, or drop the flag",
        )
