"""Security: broker accounts per role (and, to come, key scopes, tokens, secrets)."""
