"""The daemons' event loop (cli/common.py run_daemon): uvloop when installed, asyncio's own with
WAYANG_EVENT_LOOP=asyncio, and a clear error for a loop that cannot be had."""

from __future__ import annotations

import asyncio
import sys

import pytest

from wayang_mq.cli.common import EVENT_LOOP_ENV, run_daemon
from wayang_mq.core.errors import ConfigError

try:
    import uvloop  # noqa: F401

    UVLOOP = True
except ImportError:
    UVLOOP = False


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_asyncio_is_chosen_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given WAYANG_EVENT_LOOP=asyncio
    monkeypatch.setenv(EVENT_LOOP_ENV, "asyncio")
    # When a daemon's main runs
    module = run_daemon(_loop_module())
    # Then it runs on asyncio's own loop, uvloop installed or not
    assert module.startswith("asyncio")


def test_the_default_is_uvloop_when_installed_else_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given no choice in the environment
    monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    # When a daemon's main runs
    module = run_daemon(_loop_module())
    # Then it is uvloop's loop exactly when uvloop is installed (the `fast` extra)
    assert module.startswith("uvloop") is UVLOOP


def test_uvloop_asked_for_without_it_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given WAYANG_EVENT_LOOP=uvloop on a machine where uvloop cannot be imported
    monkeypatch.setenv(EVENT_LOOP_ENV, "uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    # When a daemon would start
    with pytest.raises(ConfigError, match="not installed") as raised:
        run_daemon(_loop_module())
    # Then the error says how to install it (and the daemon's coroutine was closed, unrun)
    assert "wayang-mq[fast]" in (raised.value.hint or "")


def test_an_unknown_loop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a loop name nobody knows
    monkeypatch.setenv(EVENT_LOOP_ENV, "trio")
    # Then the daemon does not start, and the error names the choices
    with pytest.raises(ConfigError, match="uvloop or asyncio"):
        run_daemon(_loop_module())
