"""Pure models of the fabric: the wire format, signing, names, errors, time. No AMQP."""
