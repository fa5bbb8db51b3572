"""docs/wire-format.md's test vector is what the code produces, byte for byte."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from wayang_mq.core.model import Task
from wayang_mq.core.signing import KeyRing, Signer
from wayang_mq.core.wire import encode, open_task

DOC = Path(__file__).resolve().parents[1] / "docs" / "wire-format.md"
# RFC 8032, section 7.1, TEST 1: the secret key (seed) and the public key the RFC derives from it
RFC8032_TEST1_SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
RFC8032_TEST1_PUBLIC_KEY = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"


def _block(tag: str) -> str:
    match = re.search(rf"```{re.escape(tag)}\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"docs/wire-format.md has no ```{tag} block"
    return match.group(1)


def _doc_keys() -> tuple[str, str]:
    """The seed and the public key the doc's test vector names, as hex."""
    match = re.search(
        r"seed \(RFC 8032, section 7\.1, TEST 1\):\s*`([0-9a-f]{64})`, whose public key is\s*"
        r"`([0-9a-f]{64})`",
        DOC.read_text(),
    )
    assert match, "docs/wire-format.md does not name the test vector's seed and public key"
    return match.group(1), match.group(2)


def _doc_headers() -> dict[str, str]:
    lines = _block("text test-vector-headers").strip().splitlines()
    return dict(line.split(": ", 1) for line in lines)


def test_the_docs_key_is_rfc8032_test1_and_its_key_id_is_derived_as_documented() -> None:
    # Given the seed and public key the doc names
    seed, public_key = _doc_keys()
    # Then they are RFC 8032's TEST 1 pair, so a reader can check them against the RFC
    assert (seed, public_key) == (RFC8032_TEST1_SEED, RFC8032_TEST1_PUBLIC_KEY)

    # When the signer is built from the seed
    signer = Signer.from_seed(bytes.fromhex(seed))

    # Then it has the doc's public key, and the key id in the doc's headers is the first 16
    # hex digits of SHA-256 over it (section 5), as a foreign client would compute it
    raw = signer.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert raw.hex() == public_key
    assert _doc_headers()["wayang-key-id"] == hashlib.sha256(raw).hexdigest()[:16]
    assert signer.key_id == hashlib.sha256(raw).hexdigest()[:16]


def test_vector_body_matches_the_encoder_byte_for_byte() -> None:
    task = Task(**json.loads(_block("json test-vector-task")))
    expected = bytes.fromhex("".join(_block("text test-vector-body").split()))
    assert encode(task) == expected


def test_vector_signature_and_key_id_match_the_signer() -> None:
    seed, _ = _doc_keys()
    signer = Signer.from_seed(bytes.fromhex(seed))
    body = bytes.fromhex("".join(_block("text test-vector-body").split()))
    assert _doc_headers() == signer.headers(body)
    task = open_task(body, _doc_headers(), KeyRing.of([signer.public_key]), at_ms=1767225600000)
    assert task.capability == "demo.echo"
