"""The dev stack's database: a private PostgreSQL (unless ``WAYANG_DATABASE_URL`` names one),
migrated to the control plane's schema, and what the demo shows of the record.

The cluster lives in ``<state>/postgres``. As root it cannot: PostgreSQL refuses to run as
root, so it runs as an unprivileged account, which cannot enter the private (0700) state dir.
Then the cluster lives in the temp dir, under a name derived from the state dir (the same
one on every start, so the record survives a restart), and ``<state>/postgres`` links to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from wayang_mq.controlplane.db import connect_async
from wayang_mq.dev.nodes import PostgresNode

POSTGRES_DIR = "postgres"  # in the state dir: the cluster, or (as root) a link to it


def postgres_node(state_dir: Path) -> PostgresNode:
    """The stack's private PostgreSQL node (not started)."""
    return PostgresNode(_cluster_dir(state_dir))


def _cluster_dir(state_dir: Path) -> Path:
    inside = state_dir / POSTGRES_DIR
    if os.geteuid() != 0:
        return inside
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:16]
    outside = Path(tempfile.gettempdir()) / f"wayang-dev-postgres-{digest}"
    if not inside.is_symlink() and not inside.exists():
        inside.symlink_to(outside, target_is_directory=True)
    return outside


def shown_url(database_url: str) -> str:
    """The URL without its password, for the terminal."""
    parts = urlsplit(database_url)
    if parts.password is None:
        return database_url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


async def recorded(database_url: str, task_ids: Sequence[str], timeout_s: float = 30) -> int:
    """How many of ``task_ids`` the record holds as finished, once all are or at the timeout
    (the control plane writes a moment after the results arrive)."""
    deadline = time.monotonic() + timeout_s
    async with await connect_async(database_url, autocommit=True) as conn:
        while True:
            cursor = await conn.execute(
                "SELECT count(*) FROM tasks WHERE task_id = ANY(%s) AND state = 'finished'",
                (list(task_ids),),
            )
            row = await cursor.fetchone()
            count = int(row[0]) if row else 0
            if count >= len(task_ids) or time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.2)
