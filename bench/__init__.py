"""End-to-end benchmarks: wayang-mq beside raw aio-pika and Celery on the same broker.

Run ``.venv/bin/python bench/run.py``; see ``docs/performance.md``. ``bench/external.py``
measures the executors for external systems (``http.call``, ``db.query``, ``payment.charge``
and the ``--rate`` limiter) through the fabric against the same work done directly.
"""
