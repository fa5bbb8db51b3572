"""The echo executor on a capability per variant (bench/prices.py): every variant's worker
runs at the same time, interleaved round by round, so each consumes a queue of its own."""

from __future__ import annotations

from typing import TYPE_CHECKING

# mypy reads workers/ as the package `workers`: to it wayang_workers is an editable install's
# import hook (which it cannot follow) or an untyped path. The code runs on wayang_workers.
if TYPE_CHECKING:
    from workers.demo import Echo
else:
    from wayang_workers.demo import Echo

#: variant -> the capability its worker serves (all-on serves demo.echo, as bench/run.py's)
CAPABILITIES = {
    "no-signatures": "bench.price.no-signatures",
    "no-schema": "bench.price.no-schema",
    "no-result-confirms": "bench.price.no-result-confirms",
    "no-heartbeats": "bench.price.no-heartbeats",
    "no-records": "bench.price.no-records",
    "sharded": "bench.echo-sharded",
}
SHARDS = 4  # bench.echo-sharded's shards (added to the applied topology by bench/prices.py)


class NoSignatures(Echo):
    serves = (CAPABILITIES["no-signatures"],)


class NoSchema(Echo):
    serves = (CAPABILITIES["no-schema"],)


class NoResultConfirms(Echo):
    serves = (CAPABILITIES["no-result-confirms"],)


class NoHeartbeats(Echo):
    serves = (CAPABILITIES["no-heartbeats"],)


class NoRecords(Echo):
    serves = (CAPABILITIES["no-records"],)


class Sharded(Echo):
    """``bench.echo-sharded`` (4 shards): one worker consumes all four."""

    serves = (CAPABILITIES["sharded"],)
