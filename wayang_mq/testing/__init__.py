"""Testing against a real broker (the ``test`` extra): the pytest plugin (``plugin``), the
fabric harness (``harness``) and the ledger that proves nothing was lost (``ledger``).

Load the plugin with ``pytest_plugins = ["wayang_mq.testing.plugin"]``.
"""
