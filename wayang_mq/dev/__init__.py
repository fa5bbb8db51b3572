"""Local development only: private RabbitMQ and PostgreSQL nodes (``nodes``) and the stack
``wayang-mq dev`` runs (``stack``). Production code never imports this package."""
