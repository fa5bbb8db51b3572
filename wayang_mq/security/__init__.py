"""Security: who may do what on the fabric (accounts, keys, tokens), secrets, TLS."""
