"""docs/wire-format.md's test vector is what the code produces, byte for byte."""

from __future__ import annotations

import json
import re
from pathlib import Path

from wayang_mq.model import Task
from wayang_mq.signing import KeyRing, Signer
from wayang_mq.wire import encode, open_task

DOC = Path(__file__).resolve().parents[1] / "docs" / "wire-format.md"
RFC8032_TEST1_SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"


def _block(tag: str) -> str:
    match = re.search(rf"```{re.escape(tag)}\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"docs/wire-format.md has no ```{tag} block"
    return match.group(1)


def test_doc_names_the_seed_the_test_uses() -> None:
    assert RFC8032_TEST1_SEED in DOC.read_text()


def test_vector_body_matches_the_encoder_byte_for_byte() -> None:
    task = Task(**json.loads(_block("json test-vector-task")))
    expected = bytes.fromhex("".join(_block("text test-vector-body").split()))
    assert encode(task) == expected


def test_vector_signature_and_key_id_match_the_signer() -> None:
    signer = Signer.from_seed(bytes.fromhex(RFC8032_TEST1_SEED))
    body = bytes.fromhex("".join(_block("text test-vector-body").split()))
    headers = dict(
        line.split(": ", 1) for line in _block("text test-vector-headers").strip().splitlines()
    )
    assert headers == signer.headers(body)
    task = open_task(body, headers, KeyRing.of([signer.public_key]), at_ms=1767225600000)
    assert task.capability == "demo.echo"
