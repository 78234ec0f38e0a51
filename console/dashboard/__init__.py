"""The Textual operator dashboard (`birthline dashboard`, docs/dashboard.md).

Its own process: it reaches the daemon only through the control API's socket (console.client) and imports
neither the appliance core, the HSM layer nor the stations (an import-linter contract says so). This package's
__init__ imports nothing, so `birthline dashboard --help` and a wrong --config answer before Textual loads.
"""
