"""The fabric's use of RabbitMQ: connections, confirmed publishing, outcomes and settle, the
consumer daemon base, the control messages and the management API."""
