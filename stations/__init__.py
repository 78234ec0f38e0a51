"""Test-station side of Birthline: wire protocol, transports, fixture client, simulator."""
