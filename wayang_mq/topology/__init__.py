"""The declarative topology: ``spec`` (TOML in, typed objects out), ``apply`` (idempotent
declare on a broker, policies through the management API), ``export`` (definitions.json), and
the default ``wayang.toml`` as package data."""
