"""The operator console's side of the control API (docs/control-api.md): the wire constants, finding the socket
from the configuration file, and an asyncio client.

This package imports only the standard library and aiohttp: a console (the Textual dashboard, a script) talks
to the daemon through its Unix socket and never loads the appliance core, the HSM layer or the station code. An
import-linter contract in pyproject.toml enforces it.
"""
