"""JSON-schema checks (``jsonschema``, the validator of the schema's own draft), as short
readable problems: a tool's arguments, a task's ``output_schema`` and the model's answer."""

from __future__ import annotations

from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs published


def schema_problem(schema: dict[str, Any]) -> str | None:
    """What makes ``schema`` not a JSON schema, or None."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        return str(exc.message)[:500]
    return None


def value_problem(schema: dict[str, Any], value: Any) -> str | None:
    """Where and why ``value`` does not match ``schema`` (the most relevant error), or None."""
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"at {where}: {error.message}"[:500]
