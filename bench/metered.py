"""The echo executor on a capability of its own, for the metrics-on wayang-mq worker
(``bench/run.py --systems wayang,wayang-metrics``): both workers run at once, interleaved
round by round, so each must consume a queue of its own or one would take the other's tasks."""

from __future__ import annotations

from wayang_mq import Executor, Task
from wayang_mq.core.model import JsonLike

#: the capability the metrics-on worker serves (added to the applied topology by bench/run.py)
CAPABILITY = "bench.echo-metrics"


class MeteredEcho(Executor):
    """``bench.echo-metrics``: returns its input unchanged, as ``demo.echo`` does."""

    serves = (CAPABILITY,)

    async def execute(self, task: Task) -> JsonLike:
        return task.input
