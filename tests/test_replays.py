"""The worker's replay memory: the same answers as a plain bounded map, in memory that does not
grow as it fills (no broker needed)."""

from __future__ import annotations

import random
import tracemalloc

from wayang_mq.core.bounded import LastSeen, LastSeenDigests
from wayang_mq.core.model import Task, now_ms
from wayang_mq.runtime.replays import AFTER_DEADLINE_MS, Replays


def test_the_digest_map_answers_as_the_bounded_map_does() -> None:
    # Given the compact map and a plain LastSeen with the same small limit
    rng = random.Random(16)
    compact, plain = LastSeenDigests(50), LastSeen[int](50)
    # When both see the same long run of puts (new keys, and keys put again) and gets
    for step in range(20_000):
        key = f"task-{rng.randrange(120)}\x00{rng.randrange(3)}"
        if rng.random() < 0.5:
            compact.put(key, step)
            plain.put(key, step)
        # Then every lookup answers the same, and both hold as many entries
        probe = f"task-{rng.randrange(120)}\x00{rng.randrange(3)}"
        assert compact.get(probe) == plain.get(probe), step
        assert len(compact) == len(plain)


def test_a_zero_limit_remembers_nothing() -> None:
    # Given a map that may keep nothing
    compact = LastSeenDigests(0)
    # When a key is put, Then it is not kept
    compact.put("a", 1)
    assert compact.get("a") is None and len(compact) == 0


def test_a_copy_of_an_attempt_is_refused_until_its_deadline_passes_and_a_redelivery_is_not() -> (
    None
):
    # Given an attempt taken once
    replays = Replays(limit=10)
    task = Task.create("demo.echo", {}, issuer="test")
    assert replays.take(task, redelivered=False)
    # When the same attempt comes again, Then a copy is refused and a redelivery is not
    assert not replays.take(task, redelivered=False)
    assert replays.take(task, redelivered=True)
    # and another attempt of the task is no copy
    assert replays.take(task.model_copy(update={"attempt": 2}), redelivered=False)
    # and an attempt remembered past its deadline plus the hour is taken afresh
    expired = task.model_copy(update={"deadline_ms": now_ms() - AFTER_DEADLINE_MS - 1})
    replays = Replays(limit=10)
    assert replays.take(expired, redelivered=False)
    assert replays.take(expired, redelivered=False)


def test_the_replay_memory_does_not_grow_as_it_fills() -> None:
    # Given the worker's replay memory, allocated (its default limit: 100,000 attempts)
    tracemalloc.start()
    try:
        replays = Replays()
        task = Task.create("demo.echo", {}, issuer="test")
        before = tracemalloc.get_traced_memory()[0]
        # When it takes 120,000 attempts (filled, then forgetting its oldest)
        for attempt in range(1, 120_001):
            replays._taken.put(f"{task.task_id}\x00{attempt}", attempt)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # Then its memory is what it was when empty (a dict of them would have grown ~30 MB)
    assert len(replays._taken) == 100_000
    assert after - before < 64 * 1024, after - before
