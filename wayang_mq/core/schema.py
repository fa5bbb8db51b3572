"""The wire's machine-readable contract: one JSON Schema per message ``type``, generated from
the models that validate every body, so the schema cannot drift from the code.

``docs/schema/<type>.json`` holds them (``wayang-mq schema --out docs/schema`` writes them; a
test checks the files are current). A client in another language validates a decoded msgpack
map against them: msgpack ``bin`` has no JSON type and appears only where the schema says any
value (``input``, ``output``, ``details``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wayang_mq.core.model import WIRE_TYPES, WireModel

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_BASE = "https://wayang-mq.dev/schema/"


def schema_of(model: type[WireModel]) -> dict[str, Any]:
    """The JSON Schema of one message type, as a reader validates it: every object map is
    closed (``additionalProperties: false``, from the models' ``extra="forbid"``)."""
    schema = model.model_json_schema(mode="validation")
    schema = {
        "$schema": SCHEMA_DIALECT,
        "$id": f"{SCHEMA_BASE}{model.wire_type}.json",
        **schema,
        "title": model.wire_type,
    }
    return schema


def all_schemas() -> dict[str, dict[str, Any]]:
    """``{wire type: schema}`` for every message type the fabric sends or accepts."""
    return {wire_type: schema_of(model) for wire_type, model in WIRE_TYPES.items()}


def write_schemas(directory: Path) -> list[Path]:
    """Write ``<type>.json`` for every message type; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for wire_type, schema in all_schemas().items():
        path = directory / f"{wire_type}.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=False, ensure_ascii=False) + "\n")
        written.append(path)
    return written
