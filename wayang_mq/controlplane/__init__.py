"""The control plane: the registry of executors and the record of every task, in PostgreSQL.

Executors never touch the database; they speak AMQP only. The control plane reads what the
fabric says (tasks, results, events, dead letters, cancels) from its queue ``wayang.record``
and writes it down, so a user can ask what happened to any task, from any client.
"""
