"""Embedded default data and nets (the quickstart)."""
