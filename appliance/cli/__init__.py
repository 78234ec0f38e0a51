"""The `birthline` command line."""
