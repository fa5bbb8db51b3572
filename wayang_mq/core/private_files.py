"""Files and directories that hold secrets (passwords, URLs with passwords, private keys).

A file is created 0600 by the ``open`` call itself, never written first and narrowed after:
in between, anyone on the machine could read it. A file that already exists (an older run
made it 0644) is narrowed before the new secret goes in.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def write_private(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path``, readable and writable by its owner only (0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        # The umask may only have removed bits, but an existing file keeps its old mode.
        os.fchmod(fd, FILE_MODE)
        handle.write(data.encode() if isinstance(data, str) else data)


def open_private_log(path: Path) -> int:
    """A file descriptor appending to ``path``, created 0600 (a daemon's log); caller closes."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, FILE_MODE)


def private_dir(path: Path, *, narrow_existing: bool = True) -> Path:
    """Create ``path`` (and missing parents) so that only its owner may enter it (0700).

    ``narrow_existing=False`` leaves a directory that already exists as it is: one a person
    chose (``keys new --dir .``) is theirs to protect; new ones are private from the start.
    """
    existed = path.is_dir()
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if narrow_existing or not existed:
        path.chmod(DIR_MODE)  # mkdir's mode is filtered by the umask; make it exact
    return path
