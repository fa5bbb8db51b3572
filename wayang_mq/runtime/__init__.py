"""What runs executors: the executor contract, task context, middleware and the worker daemon."""
