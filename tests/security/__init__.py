"""Hostile programs against the REPL sandbox (issue #5)."""
