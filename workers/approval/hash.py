"""Print the Argon2id hash of a password read from stdin, for a user's ``password_hash``::

printf '%s' 'correct horse' | python -m wayang_workers.approval.hash
"""

from __future__ import annotations

import sys

from .auth import hash_password


def main() -> int:
    """Read one password (a trailing newline is dropped), print its hash."""
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("no password on stdin", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
