"""bench/variants.py: the bench-only switches that price each guarantee (bench/prices.py).

They patch the hot path at named points; when those move, these tests say which switch lost
its point, instead of bench/prices.py silently measuring a variant with nothing switched off.
No broker: the switches are checked on the functions they replace.
"""

from __future__ import annotations

import msgpack
import pytest

from bench import variants
from wayang_mq.core import signing, wire
from wayang_mq.core.errors import InvalidMessage, SignatureError, UnknownKey
from wayang_mq.core.model import ErrorInfo, Result, Status, Task
from wayang_mq.core.signing import KeyRing, Signer


def _failed_result() -> Result:
    task = Task.create("demo.echo", {"n": 1})
    return Result.failure(task, "bench-test", ErrorInfo(code="executor_error", message="no"))


def test_every_switch_patches_an_existing_attribute_and_off_restores_it() -> None:
    # Given the attributes every switch replaces, as they are now
    before = {
        (s.name, p.name): getattr(p.owner, p.name)
        for s in variants.SWITCHES.values()
        for p in s.patches
    }
    # When every switch is off for a block
    with variants.off(variants.SWITCHES):
        during = {
            (s.name, p.name): getattr(p.owner, p.name)
            for s in variants.SWITCHES.values()
            for p in s.patches
        }
    # Then each was replaced inside it and is the original again after it
    assert all(during[key] is not original for key, original in before.items())
    for switch in variants.SWITCHES.values():
        for patch in switch.patches:
            assert getattr(patch.owner, patch.name) is before[(switch.name, patch.name)]


def test_signatures_off_signs_nothing_and_checks_key_ids_and_scopes_only() -> None:
    # Given a ring trusting one key, and a body "signed" with signatures off
    signer, stranger = Signer.generate(), Signer.generate()
    ring = KeyRing.of([signer.public_key])
    body = b"\x81\xa1n\x01"
    with variants.off(["signatures"]):
        headers = signer.headers(body)
        # When the ring verifies it, and a body from a key it does not know
        verified = ring.verify(body, headers)
        with pytest.raises(UnknownKey):
            ring.verify(body, stranger.headers(body))
    # Then no Ed25519 signature was made, the known key's scope came back, the unknown key
    # was refused; and with signatures on again the same headers do not verify
    assert signing.Signer.sign(signer, body) != variants.NO_SIGNATURE
    assert headers[signing.KEY_ID_HEADER] == signer.key_id
    assert verified.key_id == signer.key_id and verified.scope == ring.scope(signer.key_id)
    with pytest.raises(SignatureError):
        ring.verify(body, headers)


def test_schema_off_builds_usable_models_without_validating() -> None:
    # Given a FAILED result's body, and a body the schema refuses (an unknown field)
    result = _failed_result()
    body = wire.encode(result)
    fields = msgpack.unpackb(body)
    bad = msgpack.packb({**fields, "not_in_the_schema": 1})
    with variants.off(["schema"]):
        # When both are decoded with the schema off
        decoded = wire.decode(body, Result)
        unchecked = wire.decode(bad, Result)
    # Then the result's enum and nested model are usable types, the bad body went through,
    # and with the schema on again it is refused
    assert decoded.status is Status.FAILED
    assert isinstance(decoded.error, ErrorInfo) and decoded.error.message == "no"
    assert decoded.task_id == result.task_id
    assert unchecked.task_id == result.task_id
    with pytest.raises(InvalidMessage):
        wire.decode(bad, Result)
