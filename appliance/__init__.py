"""Birthline registration-authority appliance: core, daemon, CLI."""
