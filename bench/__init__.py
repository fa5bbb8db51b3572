"""End-to-end benchmarks: wayang-mq beside raw aio-pika and Celery on the same broker.

Run ``.venv/bin/python bench/run.py``; see ``docs/performance.md``.
"""
