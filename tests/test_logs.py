"""Structured logs (issue 12): JSON or text, chosen by flag, environment or the terminal; the
handled task's fields on every line; secrets redacted and control characters escaped in both."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import os
import pty
import select
import subprocess
import sys
import time
import types
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from wayang_mq.core import logs
from wayang_mq.core.redact import RedactingFilter, Redactor
from wayang_mq.testing.harness import Fabric

SECRET = "hunter2-sesame-open"


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, dict[str, io.StringIO]]]:
    """A logger writing through a JSON and a text handler, each as ``configure`` builds it
    (context stamped, a secret redacted)."""
    redactor = Redactor()
    redactor.add("db-password", SECRET)
    logger = logging.getLogger("wayang_mq.test.logs")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    streams = {"json": io.StringIO(), "text": io.StringIO()}
    handlers = []
    for name, stream in streams.items():
        handler = logging.StreamHandler(stream)
        handler.addFilter(logs.ContextFilter())
        handler.addFilter(RedactingFilter(redactor))
        handler.setFormatter(logs.formatter_for(name))  # type: ignore[arg-type]
        logger.addHandler(handler)
        handlers.append(handler)
    try:
        yield logger, streams
    finally:
        for handler in handlers:
            logger.removeHandler(handler)


def _json(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_an_event_is_one_json_object_with_its_fields_and_the_tasks(
    logged: tuple[logging.Logger, dict[str, io.StringIO]],
) -> None:
    logger, streams = logged
    # Given a task being handled
    with logs.bound(task_id="t-1", node_id="n-1", capability="demo.echo", attempt=2):
        # When an event is logged that names task_id itself, with a secret in a field
        logs.event(logger, "task.finished", task_id="t-1", status="SUCCESS", error=SECRET)
    (line,) = _json(streams["json"])
    # Then it is one object: head, event, its fields, then the bound ones, each key once
    assert list(line)[:4] == ["ts", "level", "logger", "event"]
    assert line["event"] == "task.finished" and line["level"] == "INFO"
    assert line["logger"] == "wayang_mq.test.logs"
    assert line["ts"].endswith("Z") and "T" in line["ts"]
    assert (line["task_id"], line["status"], line["attempt"]) == ("t-1", "SUCCESS", 2)
    assert (line["node_id"], line["capability"]) == ("n-1", "demo.echo")
    # and the secret is redacted, in JSON as in text
    assert line["error"] == "[secret:db-password]"
    text = streams["text"].getvalue()
    assert SECRET not in text and SECRET not in streams["json"].getvalue()
    assert text.count("task_id=") == 1 and " attempt=2" in text and "capability=demo.echo" in text
    assert "event=task.finished task_id=t-1 status=SUCCESS error=[secret:db-password]" in text


def test_a_plain_record_gets_msg_and_an_exception_exc(
    logged: tuple[logging.Logger, dict[str, io.StringIO]],
) -> None:
    logger, streams = logged
    with logs.bound(task_id="t-2", trace_id="ab" * 16):
        logger.warning("something %s happened with %s", "odd", SECRET)
        try:
            raise ValueError(f"bad {SECRET}")
        except ValueError:
            logger.exception("event=worker.bug task_id=%s next=requeued", "t-2")
    plain, bug = _json(streams["json"])
    assert plain["msg"] == "something odd happened with [secret:db-password]"
    assert (plain["task_id"], plain["trace_id"]) == ("t-2", "ab" * 16)
    # an event written as text is read back into its fields
    assert (bug["event"], bug["task_id"], bug["next"]) == ("worker.bug", "t-2", "requeued")
    assert bug["exc"].startswith("Traceback") and "[secret:db-password]" in bug["exc"]
    assert SECRET not in streams["json"].getvalue() + streams["text"].getvalue()
    # and in text, the bound task_id is not written twice
    assert streams["text"].getvalue().splitlines()[1].count("task_id=") == 1


def test_hostile_values_stay_on_one_escaped_line_of_bounded_length(
    logged: tuple[logging.Logger, dict[str, io.StringIO]],
) -> None:
    logger, streams = logged
    hostile = "a\x00b\r\nevent=forged\x1b[31m\x9b\x7f\u2028"
    logs.event(logger, "task.refused", reason=hostile, huge="x" * 100_000)
    logger.warning("%s", "y" * 100_000)
    for stream in streams.values():
        lines = stream.getvalue().split("\n")
        assert len(lines) == 3 and lines[-1] == ""  # two lines, each ended once
        # at most 16,000 characters and a "…" (text: before its control characters are
        # escaped, 4 characters each)
        assert all(len(line) <= 16_001 + 3 * 10 for line in lines)
        for control in ("\x00", "\r", "\x1b", "\x9b", "\x7f"):
            assert control not in stream.getvalue()
    assert "\u2028" not in streams["json"].getvalue()  # JSON is all ASCII
    refused, long = _json(streams["json"])
    assert refused["reason"] == "a\x00b\r\nevent=forged\x1b[31m\x9b\x7f\u2028"  # escaped, intact
    assert refused["huge"].endswith("…") and long["msg"].endswith("…")


def test_the_format_is_the_flag_else_the_environment_else_auto() -> None:
    assert logs.resolve_format(None, None) == "auto"
    assert logs.resolve_format(None, "JSON") == "json"
    assert logs.resolve_format("text", "json") == "text"
    with pytest.raises(ValueError, match="'yaml' is not one of auto, json, text"):
        logs.resolve_format(None, "yaml")


def test_a_bad_log_format_in_the_environment_is_a_one_line_usage_error() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "wayang_mq.cli", "status", "task-1"],  # it never gets to run
        env={**os.environ, "WAYANG_LOG_FORMAT": "yaml"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr == (
        "wayang-mq: error: WAYANG_LOG_FORMAT: log format 'yaml' is not one of auto, json, text\n"
    )


# -- a daemon's stderr: a terminal or not (real broker) ------------------------------------------


def _started_worker(fabric: Fabric, args: list[str], env: dict[str, str], tty: bool) -> str:
    """Start a worker daemon with stderr on a pseudo-terminal or a pipe; what it wrote up to
    its worker.started line."""
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WAYANG_")},
        "WAYANG_AMQP_URL": fabric.endpoint.amqp_url,
        "WAYANG_KEY_DIR": str(fabric.key_dir),
        **env,
    }
    command = [sys.executable, "-m", "wayang_mq.cli", *args, "worker", "wayang_workers.demo:Echo"]
    if tty:
        reader, writer = pty.openpty()
    else:
        reader, writer = os.pipe()
    process = subprocess.Popen(command, env=environment, stderr=writer, stdout=subprocess.DEVNULL)
    os.close(writer)
    seen = ""
    try:
        deadline = time.monotonic() + 60
        while "worker.started" not in seen:
            assert time.monotonic() < deadline, seen
            ready, _, _ = select.select([reader], [], [], 0.5)
            if ready:
                chunk = os.read(reader, 65536)
                assert chunk, f"it exited ({process.poll()}):\n{seen}"
                seen += chunk.decode(errors="replace")
    finally:
        process.terminate()
        process.wait(timeout=60)
        os.close(reader)
    return seen


def _started_line(output: str) -> str:
    return next(line for line in output.splitlines() if "worker.started" in line)


def test_auto_logs_text_on_a_terminal_and_json_off_one(fabric: Fabric) -> None:
    # When a worker daemon starts with stderr on a terminal, Then it writes readable text
    on_tty = _started_line(_started_worker(fabric, [], {}, tty=True))
    assert " INFO wayang_mq." in on_tty and "event=worker.started id=" in on_tty
    # When its stderr is a pipe, Then every line is a JSON object
    piped = _started_worker(fabric, [], {}, tty=False)
    started = json.loads(_started_line(piped))
    assert started["event"] == "worker.started" and started["level"] == "INFO"
    assert all(json.loads(line) for line in piped.splitlines() if line.strip())


def test_the_flag_wins_over_the_environment_which_wins_over_the_terminal(fabric: Fabric) -> None:
    # Given WAYANG_LOG_FORMAT=json on a terminal, Then JSON
    env_json = _started_line(_started_worker(fabric, [], {"WAYANG_LOG_FORMAT": "json"}, tty=True))
    assert json.loads(env_json)["event"] == "worker.started"
    # Given that and --log-format text on a pipe, Then text
    flagged = _started_worker(
        fabric, ["--log-format", "text"], {"WAYANG_LOG_FORMAT": "json"}, tty=False
    )
    assert "event=worker.started id=" in _started_line(flagged)


def test_a_coroutine_abandoned_inside_bound_closes_without_an_error() -> None:
    # Given a coroutine suspended inside logs.bound, its token made in its own context
    @types.coroutine
    def pause() -> Generator[str, None, None]:
        yield "paused"

    async def suspended() -> None:
        with logs.bound(task_id="t-1"):
            await pause()

    coroutine = suspended()
    assert contextvars.copy_context().run(coroutine.send, None) == "paused"
    # When it is closed from another context (what the garbage collector does to a
    # coroutine nobody awaits any more)
    coroutine.close()
    # Then it unwinds without raising, and this context's fields are untouched
    assert logs.context() == {}
