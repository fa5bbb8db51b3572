"""A dead letter's readable headers are built from hostile input: they must never fail.

Given inputs a msgpack task can carry but JSON cannot (bytes keys in nested maps, bytes
values, non-string keys), when the console preview is built, then it is built, masked and
bounded, and the dead letter it goes on is kept (tests/test_fuzz_wire.py sends such tasks).
"""

from __future__ import annotations

import json

from wayang_mq.core import deadnotes


def test_a_preview_of_msgpack_only_shapes_is_built() -> None:
    hostile = {
        "nested": {b"\xff\x00key": 1, 7: "seven", None: "none", b"password": "x"},
        "blob": b"\x00" * 10,
        "password": "hunter2",
    }
    preview = deadnotes.input_preview(hostile)
    decoded = json.loads(preview)
    assert decoded["blob"] == "<10 bytes>"
    assert decoded["password"] == deadnotes.MASK
    assert decoded["nested"]["7"] == "seven" and decoded["nested"]["\ufffd\x00key"] == 1
    assert "hunter2" not in preview


def test_a_preview_that_cannot_be_json_says_so_and_stays_bounded() -> None:
    deep: dict[str, object] = {}
    node = deep
    for _ in range(5_000):  # deeper than json.dumps recurses
        node["d"] = {}
        node = node["d"]  # type: ignore[assignment]
    assert deadnotes.input_preview(deep).startswith("<no preview: ")
    assert len(deadnotes.input_preview({"x": "y" * 10_000}).encode()) <= deadnotes.PREVIEW_BYTES
