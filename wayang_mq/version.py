"""The package's version, in a module of its own so that the wire codec can name it (message
``app_id``) without importing the package's public API."""

__version__ = "0.1.0"
