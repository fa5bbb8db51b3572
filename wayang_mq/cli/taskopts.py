"""``wayang-mq submit``'s task options: a flag for each option the Python API's
``Dispatcher.submit`` takes (:class:`~wayang_mq.client.dispatcher.TaskOptions`), read and
validated here, at the edge, into that same typed dict."""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from wayang_mq.core.errors import ConfigError, ErrorCode
from wayang_mq.core.model import Compensation, JsonLike, PolicyConstraints, RetryHints

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*$", re.IGNORECASE)
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}

if TYPE_CHECKING:
    from wayang_mq.client.dispatcher import TaskOptions

M = TypeVar("M", bound=BaseModel)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The task option flags (besides the input, timeouts, node id and partition key)."""
    p.add_argument("--task-id", help="the task's id: the same id is answered, not run again")
    p.add_argument(
        "--retries",
        type=int,
        default=0,
        help="retries after a failed first attempt (default 0: max attempts = N + 1)",
    )
    p.add_argument(
        "--backoff", type=float, help="seconds before the first retry (default 1), then x2"
    )
    p.add_argument(
        "--backoff-multiplier", type=float, help="each retry waits this much longer (default 2)"
    )
    p.add_argument("--max-backoff", type=float, help="seconds a retry waits at most (default 300)")
    p.add_argument(
        "--non-retryable",
        action="append",
        default=[],
        metavar="CODE",
        help="an error code never retried (repeatable), e.g. invalid_task",
    )
    p.add_argument("--idempotency-key", help="side effects at most once per key")
    p.add_argument(
        "--policy", help='placement constraints as JSON, e.g. \'{"labels": {"region": "eu"}}\''
    )
    p.add_argument(
        "--compensation", metavar="CAP", help="capability run if the task fails for good"
    )
    p.add_argument(
        "--compensation-input", default="{}", help="the compensation's input (a JSON object)"
    )
    p.add_argument(
        "--heartbeat-timeout", type=float, help="seconds of executor silence before re-dispatch"
    )
    p.add_argument(
        "--not-before",
        metavar="T",
        help="no executor may start it earlier: a time (ISO 8601, UTC unless it says) or a "
        "delay from now (30s, 5m); a worker refuses it (not_yet_valid) if it is further ahead "
        "than the worker's clock-skew allowance",
    )


def task_options(args: argparse.Namespace) -> TaskOptions:
    """The options the flags ask for; ConfigError naming the flag when one is wrong."""
    options: TaskOptions = {
        "queue_timeout_s": args.queue_timeout,
        "timeout_s": args.exec_timeout,
        "node_id": args.node_id,
        "partition_key": args.partition_key,
    }
    if args.task_id:
        options["task_id"] = args.task_id
    retry = _retry(args)
    if retry is not None:
        options["retry"] = retry
    if args.idempotency_key:
        options["idempotency_key"] = args.idempotency_key
    if args.policy:
        policy = json_object(args.policy, "--policy")
        options["policy"] = _model(PolicyConstraints, policy, "--policy")
    if args.compensation:
        fields = {
            "capability": args.compensation,
            "input": json_object(args.compensation_input, "--compensation-input"),
        }
        options["compensation"] = _model(Compensation, fields, "--compensation")
    elif args.compensation_input != "{}":
        raise ConfigError("--compensation-input needs --compensation CAP")
    if args.heartbeat_timeout is not None:
        options["heartbeat_timeout_s"] = args.heartbeat_timeout
    if args.not_before:
        options["not_before_ms"] = not_before_ms(args.not_before)
    return options


def _retry(args: argparse.Namespace) -> RetryHints | None:
    if args.retries < 0:
        raise ConfigError("--retries must be 0 or more")
    fields: dict[str, Any] = {"max_attempts": args.retries + 1}
    if args.backoff is not None:
        fields["initial_backoff_ms"] = round(args.backoff * 1000)
    if args.backoff_multiplier is not None:
        fields["backoff_multiplier"] = args.backoff_multiplier
    if args.max_backoff is not None:
        fields["max_backoff_ms"] = round(args.max_backoff * 1000)
    codes = [c.strip() for flag in args.non_retryable for c in flag.split(",") if c.strip()]
    unknown = [c for c in codes if c not in {str(e) for e in ErrorCode}]
    if unknown:
        raise ConfigError(
            f"--non-retryable {unknown[0]!r} is not an error code",
            hint="one of: " + ", ".join(str(e) for e in ErrorCode),
        )
    if codes:
        fields["non_retryable"] = codes
    if len(fields) == 1 and args.retries == 0:
        return None  # the wire's default: one attempt
    return _model(RetryHints, fields, "--retries/--backoff")


def json_object(text: str, flag: str) -> dict[str, JsonLike]:
    """A JSON object given on the command line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} is not JSON: {exc}", hint=f"e.g. {flag} '{{\"x\": 1}}'") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object", hint=f"e.g. {flag} '{{\"x\": 1}}'")
    return value


def not_before_ms(text: str, now_s: float | None = None) -> int:
    """``--not-before``: an ISO 8601 time, or a delay from now, as epoch milliseconds."""
    now = time.time() if now_s is None else now_s
    match = _DURATION.match(text)
    if match:
        return int(now * 1000) + round(float(match.group(1)) * _UNIT_MS[match.group(2).lower()])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"--not-before {text!r} is neither a time nor a delay",
            hint="e.g. --not-before 30s, --not-before 2025-01-31T12:00:00Z",
        ) from None
    when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _model(model: type[M], fields: dict[str, Any], flag: str) -> M:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{flag}: {problems}") from None
