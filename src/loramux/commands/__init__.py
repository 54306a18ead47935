"""CLI sub-commands (see loramux.cli)."""
