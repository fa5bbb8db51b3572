"""What submits tasks and waits for results: the dispatcher and its supervisor."""
