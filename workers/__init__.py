"""Concrete executors shipped with wayang-mq."""
