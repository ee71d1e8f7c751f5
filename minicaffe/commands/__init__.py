"""Subcommands of the `minicaffe` command, one module each (see minicaffe/cli.py)."""
