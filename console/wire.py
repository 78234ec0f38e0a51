"""The control API's wire constants, shared by the daemon (appliance/control) and every client.

docs/control-api.md is the contract; these names are its vocabulary. Nothing here does I/O.
"""

from __future__ import annotations

from typing import Final

API_VERSION: Final = 1
PREFIX: Final = "/v1"

# Read: anyone who can open the socket (its mode and group are the read permission).
STATUS: Final = f"{PREFIX}/status"
ALARMS: Final = f"{PREFIX}/alarms"
EVENTS: Final = f"{PREFIX}/events"  # text/event-stream (server-sent events)
# A person's console session.
LOGIN: Final = f"{PREFIX}/login"
LOGOUT: Final = f"{PREFIX}/logout"
SESSION: Final = f"{PREFIX}/session"
ACTIONS: Final = f"{PREFIX}/actions"  # POST {ACTIONS}/{action}

# The session token travels in this header ("Bearer <token>"), never in a URL.
AUTH_HEADER: Final = "Authorization"
AUTH_SCHEME: Final = "Bearer"

# Actions: name -> whether it is privileged (the body must carry "confirm": {"user", "password"} of a person
# holding the permission, who is then the one the action is authorised and audited under).
ACTION_STATION_PAUSE: Final = "station.pause"
ACTION_STATION_RESUME: Final = "station.resume"
ACTION_ALARM_ACKNOWLEDGE: Final = "alarm.acknowledge"
ACTION_WORKORDER_ACTIVATE: Final = "workorder.activate"
ACTION_WORKORDER_CLOSE: Final = "workorder.close"
ACTION_DEVICE_SCRAP: Final = "device.scrap"
ACTION_DEVICE_REWORK: Final = "device.rework"
PRIVILEGED: Final = frozenset(
    {ACTION_WORKORDER_ACTIVATE, ACTION_WORKORDER_CLOSE, ACTION_DEVICE_SCRAP, ACTION_DEVICE_REWORK}
)
ACTIONS_ALL: Final = frozenset(
    {ACTION_STATION_PAUSE, ACTION_STATION_RESUME, ACTION_ALARM_ACKNOWLEDGE} | PRIVILEGED
)

# Event types on the stream (the SSE "event:" field and the JSON "type").
EVENT_HELLO: Final = "hello"  # first on every stream
EVENT_ISSUED: Final = "issued"
EVENT_REFUSED: Final = "refused"
EVENT_PENDING: Final = "pending"
EVENT_CONFIRMED: Final = "confirmed"
EVENT_STATION: Final = "station"  # connected / disconnected / paused / resumed
EVENT_ALARM: Final = "alarm"  # raised / cleared / acknowledged
EVENT_WORKORDER: Final = "workorder"  # activated / closed
EVENT_DEVICE: Final = "device"  # scrapped / reworked
EVENT_DROPPED: Final = "dropped"  # last on a stream the daemon ends because its reader fell behind

# Error codes in {"error": code, "message": text} answers.
ERR_BAD_REQUEST: Final = "bad_request"  # 400
ERR_UNAUTHENTICATED: Final = "unauthenticated"  # 401: no session, or it expired
ERR_LOGIN_FAILED: Final = "login_failed"  # 401: wrong name or password, account locked or disabled
ERR_FORBIDDEN: Final = "forbidden"  # 403: the person's role does not allow the action
ERR_NOT_FOUND: Final = "not_found"  # 404
ERR_METHOD_NOT_ALLOWED: Final = "method_not_allowed"  # 405: a path answered with another method
ERR_CONFLICT: Final = "conflict"  # 409: not possible in the current state (already paused, closed, ...)
ERR_TOO_LARGE: Final = "too_large"  # 413
ERR_BUSY: Final = "busy"  # 503: too many connections, streams or sessions
ERR_UNAVAILABLE: Final = "unavailable"  # 503: the journal or audit log cannot be written
ERR_INTERNAL: Final = "internal"  # 500
