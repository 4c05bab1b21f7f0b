"""Subcommand implementations: each module turns parsed CLI arguments into calls on the library."""
