"""Reading usage for billing: ``wayang-mq usage``, summed from the ``usage`` table.

The store writes one row per billed attempt (``store._bill``: the winning result and each
retried attempt's FAILED result, the first terminal result per attempt and executor; never a
duplicate, fenced, replayed or PENDING one). Here they are summed over a window of finish
times, per capability, executor, workflow node or issuer, with a total over all of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from wayang_mq.controlplane.queries import Conn, Row
from wayang_mq.core.errors import ConfigError

#: ``--by`` names and the usage column each groups on
GROUPS = {
    "capability": "capability",
    "executor": "executor_id",
    "node": "node_id",  # the workflow node the task belongs to (Task.node_id)
    "issuer": "issuer",
}


def group_by(text: str) -> str:
    """``text`` as a ``--by`` name, else a ConfigError saying which exist."""
    if text.lower() in GROUPS:
        return text.lower()
    raise ConfigError(f"--by {text!r} is not a grouping", hint=f"use one of {', '.join(GROUPS)}")


def check_window(since: datetime, until: datetime) -> None:
    """A ConfigError unless the window ``[since, until)`` ends after it starts."""
    if until <= since:
        raise ConfigError(
            f"--until {until.isoformat()} is not after --since {since.isoformat()}",
            hint="give a window that ends after it starts, e.g. --since 2h --until 1h",
        )


@dataclass(frozen=True, slots=True)
class UsageSum:
    """What one group used (``group`` None: the total over every group)."""

    group: str | None
    tasks: int  # distinct task ids (a task retried on two executors counts in both groups)
    attempts: int  # billed attempts (usage rows)
    wall_ms: float
    cpu_ms: float
    bytes_in: int
    bytes_out: int
    units: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> Row:
        """For ``--json``."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class UsageReport:
    """``wayang-mq usage``: the window, the grouping, each group's sums and the total."""

    since: datetime
    until: datetime
    by: str | None
    groups: list[UsageSum]
    total: UsageSum

    def unit_names(self) -> list[str]:
        """Every unit any group reported, in name order (the table's columns)."""
        return sorted(self.total.units)

    def as_json(self) -> Row:
        """For ``--json``."""
        return {
            "since": self.since.astimezone(UTC).isoformat(),
            "until": self.until.astimezone(UTC).isoformat(),
            "by": self.by,
            "groups": [g.as_json() for g in self.groups],
            "total": self.total.as_json(),
        }


def usage(conn: Conn, since: datetime, until: datetime, by: str | None = None) -> UsageReport:
    """Usage of the attempts that finished in ``[since, until)``, per ``by`` (a key of
    :data:`GROUPS`) and in total."""
    check_window(since, until)
    # the grouping column comes from GROUPS only, never from the user's text
    if by is None:
        grp, totals, sets, unit_sets = "NULL::text", "1", "", "GROUP BY u.key"
    else:
        key = GROUPS[by]
        grp, totals = key, f"grouping({key})"
        sets = f" GROUP BY GROUPING SETS (({key}), ()) ORDER BY {totals}, {key}"
        unit_sets = f"GROUP BY GROUPING SETS (({key}, u.key), (u.key))"
    window = (since, until)
    sums = conn.execute(
        f"SELECT {grp} AS grp, {totals} AS total, count(DISTINCT task_id) AS tasks,"
        " count(*) AS attempts, coalesce(sum(wall_ms), 0)::float8 AS wall_ms,"
        " coalesce(sum(cpu_ms), 0)::float8 AS cpu_ms,"
        " coalesce(sum(bytes_in), 0)::bigint AS bytes_in,"
        " coalesce(sum(bytes_out), 0)::bigint AS bytes_out"
        f" FROM usage WHERE finished_at >= %s AND finished_at < %s{sets}",
        window,
    ).fetchall()
    units = conn.execute(
        f"SELECT {grp} AS grp, {totals} AS total, u.key AS unit,"
        " sum(u.value::float8) AS amount FROM usage, jsonb_each_text(units) AS u"
        f" WHERE finished_at >= %s AND finished_at < %s {unit_sets}",
        window,
    ).fetchall()
    found: dict[tuple[bool, str | None], dict[str, float]] = {}
    for r in units:
        found.setdefault((bool(r["total"]), r["grp"]), {})[r["unit"]] = float(r["amount"])
    made = [_sum(r, found.get((bool(r["total"]), r["grp"]), {})) for r in sums]
    groups = [s for s, r in zip(made, sums, strict=True) if not r["total"]]
    overall = [s for s, r in zip(made, sums, strict=True) if r["total"]]
    total = overall[0] if overall else UsageSum(None, 0, 0, 0.0, 0.0, 0, 0)
    return UsageReport(since, until, by, groups if by is not None else [], total)


def _sum(r: Row, units: dict[str, float]) -> UsageSum:
    return UsageSum(
        group=None if r["total"] else r["grp"],
        tasks=int(r["tasks"]),
        attempts=int(r["attempts"]),
        wall_ms=float(r["wall_ms"]),
        cpu_ms=float(r["cpu_ms"]),
        bytes_in=int(r["bytes_in"]),
        bytes_out=int(r["bytes_out"]),
        units=dict(sorted(units.items())),
    )
