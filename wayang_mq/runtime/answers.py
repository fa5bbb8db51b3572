"""Answering a task later: the terminal result of a task an executor accepted with
:class:`~wayang_mq.runtime.executor.Pending` (a person decides, an outside system calls back).

The executor keeps a :class:`TaskRef` (JSON, safe to store in a database or a form's hidden
field: it holds no secret, and the result is signed with the answering process's own key),
and whoever decides later publishes the answer with :class:`Answers`::

    ref = TaskRef.of(task)                       # in execute(), before returning Pending(...)
    ...
    async with Answers(amqp_url, signer, "approvals-1") as answers:
        await answers.succeed(TaskRef.model_validate_json(stored), {"approved": True})

The result goes to the task's reply address, as an executor's would, and is confirmed by the
broker before the call returns. The dispatcher hands out the first terminal result per task and
fences an answer whose token a newer attempt replaced.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from aio_pika.abc import AbstractRobustConnection

from wayang_mq.amqp.connect import connect
from wayang_mq.amqp.publisher import ConfirmedPublisher, to_amqp
from wayang_mq.core import names
from wayang_mq.core.errors import WayangError
from wayang_mq.core.model import ErrorInfo, JsonLike, Result, Status, TaskRef
from wayang_mq.core.signing import Signer
from wayang_mq.core.wire import signed_message


class Answers:
    """Publishes terminal results for tasks answered PENDING earlier."""

    def __init__(self, amqp_url: str, signer: Signer, answerer_id: str) -> None:
        self._amqp_url = amqp_url
        self._signer = signer
        self.answerer_id = answerer_id  # the result's executor_id
        self._connection: AbstractRobustConnection | None = None
        self._publisher: ConfirmedPublisher | None = None

    @classmethod
    def sharing(cls, publisher: ConfirmedPublisher, signer: Signer, answerer_id: str) -> Answers:
        """Answers that publish through an open confirmed publisher (a worker's own), already
        open: no ``async with`` needed, and closing them leaves the publisher open."""
        answers = cls("", signer, answerer_id)
        answers._publisher = publisher
        return answers

    async def __aenter__(self) -> Self:
        connection = await connect(self._amqp_url, f"answers {self.answerer_id}")
        self._connection = connection
        channel = await connection.channel(publisher_confirms=True)
        self._publisher = ConfirmedPublisher(channel)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        connection = self._connection
        self._connection = self._publisher = None
        if connection is not None:
            await connection.close()

    async def succeed(self, ref: TaskRef, output: JsonLike = None) -> Result:
        """Answer the task SUCCESS with ``output``."""
        return await self.answer(ref, Status.SUCCESS, output=output)

    async def fail(self, ref: TaskRef, error: ErrorInfo) -> Result:
        """Answer the task FAILED with ``error``."""
        return await self.answer(ref, Status.FAILED, error=error)

    async def answer(
        self,
        ref: TaskRef,
        status: Status,
        *,
        output: JsonLike = None,
        error: ErrorInfo | None = None,
    ) -> Result:
        """Publish the task's result and wait for the broker's confirm; returns it.

        Raises a :class:`WayangError` (e.g. ``BrokerUnreachable``) when the broker does not
        confirm it: publish again, the dispatcher drops a duplicate.
        """
        if self._publisher is None:
            raise WayangError("answers are not open", hint="use `async with Answers(...)`")
        result = Result.answering(ref, self.answerer_id, status, output=output, error=error)
        key = ref.reply_to or names.noreply_routing_key(ref.capability)
        signed = signed_message(result, self._signer, message_id=ref.task_id, reply_to=key)
        await self._publisher.publish(names.RESULTS_EXCHANGE, key, to_amqp(signed))
        return result
