"""Loading a ``module:Class`` named on the command line or in a setting (executors, middleware,
secret providers), with one-line errors a person can act on."""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

from wayang_mq.core.errors import ConfigError

T = TypeVar("T")


def load_class(spec: str, base: type[T], example: str) -> T:
    """Import ``module:Class``, check it subclasses ``base``, and instantiate it, with
    one-line errors for the CLI (executors, middleware)."""
    instance: T = load_type(spec, base, example)()
    return instance


def load_type(spec: str, base: type[T], example: str) -> type[T]:
    """Import ``module:Class`` and check it subclasses ``base`` (not instantiated)."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"{spec!r} is not MODULE:CLASS", hint=f"e.g. {example}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import module {module_name!r}: {exc}",
            hint="is it installed, or on PYTHONPATH?",
        ) from exc
    cls: Any = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{spec} is not a {base.__module__}.{base.__name__} subclass")
    found: type[T] = cls
    return found
