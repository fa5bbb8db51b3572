"""``wayang-mq top``: a refreshing terminal view of the fabric (capabilities' queues, live
executors, the slowest running tasks), from the management API and the control plane's record.

On a terminal it redraws every ``--interval`` seconds until ``q`` or Ctrl-C; with ``--once``,
or when stdout is not a terminal (a pipe, a file, a script), it prints one plain frame and
exits. A broker or database that goes away is an error line in the view, which keeps
refreshing until it comes back.
"""

from __future__ import annotations

import argparse
import contextlib
import select
import sys
import termios
import tty
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from wayang_mq.cli.common import capability_arg
from wayang_mq.cli.exits import Exit
from wayang_mq.config import Settings
from wayang_mq.core.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table

    from wayang_mq.cli.snapshot import FabricSources, Snapshot

#: seconds a management API call may take before the view shows the broker unreachable
MANAGEMENT_TIMEOUT_S = 3.0
#: the width of a plain frame (not a terminal: nothing says how wide the reader is)
PLAIN_WIDTH = 140
QUIT_KEYS = frozenset("qQ")
#: the narrowest a name column gets on a narrow terminal (numbers keep their width)
TEXT_MIN_WIDTH = 10


def add(sub: Any) -> None:
    """Register this verb's parser and handler."""
    p = sub.add_parser(
        "top", help="a live view: queues, rates, executors, slowest running tasks (q quits)"
    )
    p.add_argument(
        "--interval", type=float, default=2.0, help="seconds between refreshes (default 2)"
    )
    p.add_argument("--once", action="store_true", help="print one frame and exit (for scripts)")
    p.add_argument(
        "--capability",
        action="append",
        default=[],
        metavar="C",
        help="show only this capability (repeatable; default: every one in the topology)",
    )
    p.set_defaults(func=_cmd_top)


def _cmd_top(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console

    if not 0.2 <= args.interval <= 3600:
        raise ConfigError(f"--interval {args.interval} is out of range", hint="0.2 to 3600 s")
    sources = _sources(settings, [capability_arg(c) for c in args.capability])
    console = Console()
    if args.once or not console.is_terminal:
        if not console.is_terminal:
            console = Console(width=PLAIN_WIDTH, highlight=False)
        snapshot = sources.snapshot()
        console.print(frame(snapshot, footer=None))
        return Exit.UNREACHABLE if snapshot.broker_error else Exit.OK
    _live(sources, console, args.interval)
    return Exit.OK


def _sources(settings: Settings, capabilities: list[str]) -> FabricSources:
    from wayang_mq.amqp.connect import management_client
    from wayang_mq.cli.snapshot import FabricSources
    from wayang_mq.config import broker_endpoint, saved_database_url
    from wayang_mq.topology.spec import load_topology

    endpoint = broker_endpoint(settings)  # the management API needs a monitoring account
    database_url = (
        settings.database_url.get_secret_value()
        if settings.database_url is not None
        else saved_database_url(settings)
    )
    return FabricSources(
        management_client(endpoint, timeout_s=MANAGEMENT_TIMEOUT_S),
        load_topology(settings.topology),
        capabilities=capabilities,
        database_url=database_url,
    )


def _live(sources: FabricSources, console: Any, interval_s: float) -> None:
    """Redraw until a quit key or Ctrl-C (the caller's KeyboardInterrupt ends it too)."""
    from rich.live import Live

    footer = f"q quit · Ctrl-C quit · refresh every {interval_s:g}s"
    with (
        _keys(sys.stdin) as keys,
        Live(console=console, screen=True, auto_refresh=False) as live,
    ):
        while True:
            live.update(frame(sources.snapshot(), footer=footer), refresh=True)
            if _quit_pressed(keys, interval_s):
                return


@contextlib.contextmanager
def _keys(stream: IO[str]) -> Iterator[IO[str] | None]:
    """The terminal in cbreak mode (single keys, no echo; Ctrl-C still interrupts), restored
    on the way out; None when stdin is not a terminal (then no key quits, Ctrl-C does)."""
    if not stream.isatty():
        yield None
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield stream
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(keys: IO[str] | None, wait_s: float) -> bool:
    """Wait ``wait_s`` for a quit key; True if one came."""
    if keys is None:
        select.select([], [], [], wait_s)
        return False
    ready, _, _ = select.select([keys], [], [], wait_s)
    if not ready:
        return False
    pressed = keys.read(1)
    return pressed == "" or pressed in QUIT_KEYS  # "": stdin closed


# -- rendering --------------------------------------------------------------------------------


def frame(snapshot: Snapshot, *, footer: str | None) -> RenderableType:
    """One frame: header, error lines, capabilities, retry tiers, executors, running tasks."""
    from rich.console import Group
    from rich.text import Text

    parts: list[RenderableType] = [_header(snapshot)]
    for error in (snapshot.broker_error, snapshot.database_error):
        if error:
            parts.append(Text(error, style="bold red"))
    parts.append(_capabilities(snapshot))
    if snapshot.tiers:
        tiers = " · ".join(f"{t.name} {t.depth}" for t in snapshot.tiers)
        parts.append(Text(f"retry tiers (waiting): {tiers}"))
    parts.append(_executors(snapshot))
    parts.append(_running(snapshot))
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


def _header(snapshot: Snapshot) -> RenderableType:
    from rich.text import Text

    header = Text("wayang-mq top", style="bold")
    header.append(f" · broker {snapshot.management_url}")
    if snapshot.broker is not None:
        broker = snapshot.broker
        header.append(f" · node {broker.node} (RabbitMQ {broker.version})")
        header.append(" · alarms: ")
        if broker.alarms:
            header.append(", ".join(broker.alarms), style="bold red")
        else:
            header.append("none", style="green")
    header.append(f" · {snapshot.taken_at:%Y-%m-%d %H:%M:%S} UTC")
    return header


def _table(title: str, *columns: str) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        if column in _TEXT_COLUMNS:  # on a narrow terminal names wrap rather than vanish
            table.add_column(column, overflow="fold", min_width=TEXT_MIN_WIDTH)
        else:
            table.add_column(column, justify="right", no_wrap=True)
    return table


_TEXT_COLUMNS = frozenset(
    {"CAPABILITY", "CAPABILITIES", "EXECUTOR", "CONNECTION", "TASK", "PROGRESS", "LAST SEEN"}
)


def _capabilities(snapshot: Snapshot) -> RenderableType:
    table = _table(
        "CAPABILITIES",
        "CAPABILITY",
        "QUEUES",
        "DEPTH",
        "READY",
        "UNACKED",
        "PUBLISH/S",
        "DELIVER/S",
        "CONSUMERS",
        "DEAD",
    )
    for c in snapshot.capabilities:
        queues = (
            str(c.queues) if c.queues == c.expected_queues else f"{c.queues}/{c.expected_queues}"
        )
        table.add_row(
            _plain(c.capability),
            queues if c.queues == c.expected_queues else f"[red]{queues}[/red]",
            str(c.depth),
            str(c.ready),
            str(c.unacked),
            f"{c.publish_rate:.1f}",
            f"{c.deliver_rate:.1f}",
            str(c.consumers) if c.consumers else "[yellow]0[/yellow]",
            f"[red]{c.dead}[/red]" if c.dead else "0",
        )
    return table


def _executors(snapshot: Snapshot) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    if snapshot.executors is not None:
        table = _table("EXECUTORS (registry)", "EXECUTOR", "LOAD", "IN FLIGHT", "LAST SEEN")
        table.add_column("CAPABILITIES", overflow="fold")
        for e in snapshot.executors:
            load = e.in_flight / e.concurrency if e.concurrency else 0.0
            table.add_row(
                _plain(e.executor_id),
                f"{load:.0%}",
                f"{e.in_flight}/{e.concurrency}",
                f"{e.last_seen_age_s:.0f}s ago",
                _plain(",".join(e.capabilities)),
            )
        if not snapshot.executors:
            return Group(table, Text("no live executor in the registry", style="yellow"))
        return table
    table = _table("EXECUTORS (the broker's consumers)", "CONNECTION", "CONSUMERS", "PREFETCH")
    table.add_column("CAPABILITIES", overflow="fold")
    for g in snapshot.consumers:
        table.add_row(
            _plain(g.connection),
            str(g.consumers),
            str(g.prefetch),
            _plain(",".join(g.capabilities)),
        )
    if not snapshot.database_configured:
        note = (
            "no database (set WAYANG_DATABASE_URL, or run `wayang-mq dev`): load, last seen "
            "and running tasks come from the control plane's record"
        )
        return Group(table, Text(note, style="yellow"))
    return table


def _running(snapshot: Snapshot) -> RenderableType:
    if snapshot.executors is None:
        from rich.text import Text

        return Text("")
    table = _table("SLOWEST RUNNING TASKS", "TASK", "CAPABILITY", "EXECUTOR", "ATTEMPT", "RUNNING")
    table.add_column("PROGRESS", overflow="fold")
    for t in snapshot.running:
        done = "" if t.fraction is None else f"{t.fraction:.0%} "
        table.add_row(
            _plain(t.task_id),
            _plain(t.capability),
            _plain(t.executor_id),
            str(t.attempt),
            _duration(t.running_s),
            _plain(f"{done}{t.message}".strip() or "-"),
        )
    return table


def _plain(text: str) -> Any:
    """Names and executor-written text as they are: never read as rich markup."""
    from rich.text import Text

    return Text(text)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"
