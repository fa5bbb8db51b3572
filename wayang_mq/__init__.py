"""wayang-mq: Wayang's execution fabric on RabbitMQ.

Executors are worker daemons bound to capability queues; the dispatcher publishes signed msgpack
tasks and collects results; see README.md and docs/.
"""

from wayang_mq.core.errors import ErrorCode, ExecutorError, WayangError
from wayang_mq.core.model import (
    Compensation,
    ErrorInfo,
    Heartbeat,
    PolicyConstraints,
    Progress,
    Registration,
    Result,
    RetryHints,
    Status,
    Task,
    TaskRef,
)
from wayang_mq.runtime.context import TaskContext, current
from wayang_mq.runtime.executor import Executor, Pending, TaskState, TaskStatus
from wayang_mq.runtime.middleware import Middleware
from wayang_mq.version import __version__ as __version__

__all__ = [
    "Compensation",
    "ErrorCode",
    "ErrorInfo",
    "Executor",
    "ExecutorError",
    "Heartbeat",
    "Middleware",
    "Pending",
    "PolicyConstraints",
    "Progress",
    "Registration",
    "Result",
    "RetryHints",
    "Status",
    "Task",
    "TaskContext",
    "TaskRef",
    "TaskState",
    "TaskStatus",
    "WayangError",
    "current",
]
