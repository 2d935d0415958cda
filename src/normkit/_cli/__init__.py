"""The ``normkit`` command line: ``normkit <command> ...``; one module per command (see main.py)."""
