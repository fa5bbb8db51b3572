"""Files that hold secrets are the owner's alone (0600), in directories only the owner enters."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_cli import wayang
from wayang_mq.amqp.endpoint import BrokerEndpoint
from wayang_mq.config import ENDPOINT_FILE, save_endpoint
from wayang_mq.core.private_files import write_private


def mode(path: Path) -> int:
    """The permission bits of ``path`` (0o600, 0o700, ...)."""
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """A umask that filters nothing: what a file gets is what its creator asked for."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_a_private_file_is_created_0600_whatever_the_umask(
    tmp_path: Path, permissive_umask: None
) -> None:
    # Given a umask that would let a plain write make the file world-readable
    path = tmp_path / "secret"

    # When a secret is written
    write_private(path, "hunter2")

    # Then only the owner may read it
    assert mode(path) == 0o600
    assert path.read_text() == "hunter2"


def test_saving_the_endpoint_over_a_world_readable_one_makes_it_private(tmp_path: Path) -> None:
    # Given an endpoint file an older version left world-readable
    path = tmp_path / ENDPOINT_FILE
    path.write_text("{}")
    path.chmod(0o644)
    endpoint = BrokerEndpoint.from_url("amqp://wayang:s3cret@127.0.0.1:5672/")

    # When dev saves its endpoint (the URL carries the password)
    save_endpoint(tmp_path, endpoint)

    # Then the file is the owner's alone
    assert mode(path) == 0o600
    assert "s3cret" in path.read_text()


def test_keys_new_writes_the_private_key_0600_in_a_new_0700_directory(tmp_path: Path) -> None:
    # Given a key directory that does not exist yet
    key_dir = tmp_path / "new" / "keys"

    # When a keypair is made there
    run = wayang("keys", "new", "--dir", str(key_dir))

    # Then the directory and the private key are private, the public key is not
    assert run.returncode == 0, run.stderr
    (private,) = key_dir.glob("*.key")
    assert mode(key_dir) == 0o700
    assert mode(private) == 0o600
    assert mode(private.with_suffix(".pub")) & 0o044  # meant to be copied around


def test_keys_new_leaves_an_existing_directory_as_its_owner_set_it(tmp_path: Path) -> None:
    # Given a directory someone chose, shared on purpose
    tmp_path.chmod(0o755)

    # When a keypair is made in it
    run = wayang("keys", "new", "--dir", str(tmp_path))

    # Then its mode is theirs to decide; the private key in it is private regardless
    assert run.returncode == 0, run.stderr
    assert mode(tmp_path) == 0o755
    assert mode(next(tmp_path.glob("*.key"))) == 0o600
