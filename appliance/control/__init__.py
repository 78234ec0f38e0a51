"""The daemon's control plane: the control API on a Unix socket (docs/control-api.md), the event stream, the
console's actions, the OpenMetrics endpoint (docs/metrics.md). Composed by plane.ControlPlane in the daemon.

Clients use the `console` package (stdlib and aiohttp only), never this one.
"""
