"""Key files are read without ``cryptography`` when they are in RFC 8410's plain form, and the
same as ``cryptography`` reads them in any form (no broker needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wayang_mq.core.errors import ConfigError
from wayang_mq.core.signing import KeyRing, Signer, key_id_of, write_keypair


def test_a_worker_loads_and_uses_its_keys_without_importing_cryptography(tmp_path: Path) -> None:
    # Given a key pair written by `wayang-mq keys new`
    write_keypair(tmp_path)
    # When a fresh process loads the signing key and the key ring, signs and verifies
    script = (
        "import sys; from pathlib import Path\n"
        "from wayang_mq.core.signing import KeyRing, Signer\n"
        f"d = Path({str(tmp_path)!r})\n"
        "signer = Signer.from_file(next(d.glob('*.key')))\n"
        "ring = KeyRing.load_dir(d)\n"
        "assert ring.verify(b'x', signer.headers(b'x')).key_id == signer.key_id\n"
        "print('cryptography' in sys.modules)\n"
    )
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    # Then it works, and cryptography was never imported
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "False"


def test_keys_in_another_pem_form_load_as_cryptography_reads_them(tmp_path: Path) -> None:
    # Given a key pair whose files carry text before the PEM block (as openssl's -text does)
    signer = Signer.generate()
    key_path, pub_path = write_keypair(tmp_path, signer)
    for path in (key_path, pub_path):
        path.write_bytes(b"a comment line\n" + path.read_bytes())
    # When they are loaded
    loaded = Signer.from_file(key_path)
    ring = KeyRing.load_dir(tmp_path)
    # Then they are the same keys: same ids, and signatures verify both ways
    assert loaded.key_id == signer.key_id == key_id_of(signer.public_key)
    assert set(ring.keys) == ring.key_ids == {signer.key_id}
    assert ring.verify(b"body", loaded.headers(b"body")).key_id == signer.key_id
    assert ring.verify(b"body", signer.headers(b"body")).key_id == signer.key_id


def test_a_damaged_key_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    # Given a key pair whose public key lost a byte and whose private key is not base64
    key_path, pub_path = write_keypair(tmp_path)
    pub_path.write_bytes(pub_path.read_bytes().replace(b"A", b"", 1))
    key_path.write_bytes(key_path.read_bytes().replace(b"\n", b"\n!", 1))
    # When they are loaded, Then each is refused as a configuration error
    with pytest.raises(ConfigError, match="cannot read public key"):
        KeyRing.load_dir(tmp_path)
    with pytest.raises(ConfigError, match="cannot read signing key"):
        Signer.from_file(key_path)
