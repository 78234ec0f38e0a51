"""The console's actions: each authorised by the same users and roles as the CLI, and audited under the person.

A person logs in once per console session (`login`, audited by users.login like a CLI login). Operator actions
(pause and resume a station, acknowledge an alarm) are authorised by the session's person. Privileged actions
(activate or close a work order, scrap a device, approve a rework) ask again for a password: the request carries
`confirm` = {user, password} of a person holding the permission (the supervisor standing at the console, or the
session's own person typing theirs again); that login is checked and audited, and the action is authorised and
audited under that person, with the session's person recorded beside it (`session`). A refused action is
audited too (`control.refused`). Passwords are never logged, stored or echoed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from appliance.alarms import Alarms
from appliance.control.events import EventBus
from appliance.control.sessions import ConsoleSession, Sessions
from appliance.errors import BirthlineError, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.pauses import PauseError, StationPauses
from appliance.issuance.policy import AuditSink
from appliance.production import store, users
from appliance.production.model import ProductionError
from appliance.production.users import AuthError, Permission, User
from console import wire

FIELD_MAX = 128
REASON_MAX = 200

PERMISSION: Mapping[str, Permission] = {
    wire.ACTION_STATION_PAUSE: Permission.STATION_PAUSE,
    wire.ACTION_STATION_RESUME: Permission.STATION_PAUSE,
    wire.ACTION_ALARM_ACKNOWLEDGE: Permission.ALARM_ACKNOWLEDGE,
    wire.ACTION_WORKORDER_ACTIVATE: Permission.WORK_ORDER,
    wire.ACTION_WORKORDER_CLOSE: Permission.WORK_ORDER,
    wire.ACTION_DEVICE_SCRAP: Permission.SCRAP,
    wire.ACTION_DEVICE_REWORK: Permission.REWORK,
}


class ActionError(Exception):
    """A refusal the API answers with `status` and {"error": code, "message": message}."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_request(message: str) -> ActionError:
    return ActionError(400, wire.ERR_BAD_REQUEST, message)


def _unavailable(exc: BirthlineError) -> ActionError:
    if exc.code in (ReasonCode.JOURNAL_UNAVAILABLE, ReasonCode.AUDIT_UNAVAILABLE):
        return ActionError(503, wire.ERR_UNAVAILABLE, exc.message)
    return ActionError(409, wire.ERR_CONFLICT, exc.message)


def text_field(body: Mapping[str, Any], name: str, limit: int = FIELD_MAX, *, required: bool = True) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{name!r} is required (a non-empty string)")
    if len(value) > limit:
        raise bad_request(f"{name!r} is longer than {limit} characters")
    if any(not ch.isprintable() for ch in value):
        raise bad_request(f"{name!r} contains control characters")
    return value


def _password(body: Mapping[str, Any], key: str, shown: str = "") -> str:
    password = body.get(key)
    if not isinstance(password, str) or not password:
        raise bad_request(f"{shown or key!r} is required (a non-empty string)")
    if len(password) > users.PASSWORD_MAX:
        raise bad_request(f"{shown or key!r} is longer than {users.PASSWORD_MAX} characters")
    return password


class _Via:
    """An AuditSink that adds who and where to every entry of one action (the store functions write them)."""

    def __init__(self, audit: AuditSink, extra: Mapping[str, Any]) -> None:
        self.audit = audit
        self.extra = dict(extra)

    def append(self, conn: sqlite3.Connection, actor: str, event: str, data: Mapping[str, Any]) -> Any:
        return self.audit.append(conn, actor, event, {**data, **self.extra})

    def record(self, actor: str, event: str, data: Mapping[str, Any]) -> Any:
        return self.audit.record(actor, event, {**data, **self.extra})


@dataclass
class Actions:
    journal: Journal
    audit: AuditSink
    alarms: Alarms
    pauses: StationPauses
    bus: EventBus
    sessions: Sessions
    issuing_ca: str
    on_revoked: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        # scrypt is deliberately slow and memory-hard: one login at a time, off the event loop.
        self._logins = asyncio.Semaphore(1)

    # -- sessions --------------------------------------------------------------------------------------------------
    async def _check_password(self, name: str, password: str) -> User:
        async with self._logins:
            try:
                return await asyncio.to_thread(users.login, self.journal, self.audit, name, password)
            except AuthError as exc:  # never the name as typed: it may be a password typed in the wrong field
                raise ActionError(401, wire.ERR_LOGIN_FAILED, f"login refused: {exc.why}") from None
            except BirthlineError as exc:
                raise _unavailable(exc) from None

    async def login(self, body: Mapping[str, Any]) -> tuple[str, ConsoleSession]:
        name = text_field(body, "user", 64)
        user = await self._check_password(name, _password(body, "password"))
        return self.sessions.open(user)

    # -- actions ---------------------------------------------------------------------------------------------------
    async def perform(self, action: str, session: ConsoleSession, body: Mapping[str, Any]) -> dict[str, Any]:
        permission = PERMISSION.get(action)
        if permission is None:
            raise ActionError(404, wire.ERR_NOT_FOUND, f"no action named {action[:64]!r}")
        person = session.user
        if action in wire.PRIVILEGED:
            confirm = body.get("confirm")
            if not isinstance(confirm, Mapping):
                raise bad_request(
                    f"{action} is a privileged action: 'confirm' must carry the user and password of a person"
                    f" allowed to {permission.value}"
                )
            name = text_field(confirm, "user", 64)
            person = await self._check_password(name, _password(confirm, "password", "confirm.password"))
        try:
            person.require(permission)
        except AuthError as exc:
            await self._refused(person, session, action, exc.message)
            raise ActionError(403, wire.ERR_FORBIDDEN, exc.message) from None
        extra = {"via": "console", "session": session.user.name}
        try:
            return await self._do(action, person, body, extra)
        except ProductionError as exc:
            missing = exc.message.startswith("no ") or "has no certificate" in exc.message
            raise ActionError(404 if missing else 409, wire.ERR_NOT_FOUND if missing else wire.ERR_CONFLICT,
                              exc.message) from None  # fmt: skip
        except PauseError as exc:
            raise ActionError(404 if exc.missing else 409, wire.ERR_NOT_FOUND if exc.missing else wire.ERR_CONFLICT,
                              str(exc)) from None  # fmt: skip
        except BirthlineError as exc:
            raise _unavailable(exc) from None

    async def _refused(self, person: User, session: ConsoleSession, action: str, why: str) -> None:
        # The refusal stands even if the log cannot record it (its own alarm says so).
        with contextlib.suppress(BirthlineError):
            await asyncio.to_thread(
                self.audit.record, person.name, "control.refused",
                {"action": action, "why": why, "via": "console", "session": session.user.name},
            )  # fmt: skip

    async def _do(
        self, action: str, person: User, body: Mapping[str, Any], extra: dict[str, Any]
    ) -> dict[str, Any]:
        via = _Via(self.audit, extra)
        if action == wire.ACTION_STATION_PAUSE:
            station = text_field(body, "station")
            reason = text_field(body, "reason", REASON_MAX, required=False) or "paused from the console"
            pause = await self.pauses.pause(station, person.name, reason, self.audit, **extra)
            self.bus.publish(wire.EVENT_STATION, {"station": station, "state": "paused", "by": person.name,
                                                  "reason": reason})  # fmt: skip
            return {"station": station, "paused": pause.snapshot()}
        if action == wire.ACTION_STATION_RESUME:
            station = text_field(body, "station")
            await self.pauses.resume(station, person.name, self.audit, **extra)
            self.bus.publish(wire.EVENT_STATION, {"station": station, "state": "resumed", "by": person.name})
            return {"station": station, "paused": None}
        if action == wire.ACTION_ALARM_ACKNOWLEDGE:
            return await self._acknowledge(text_field(body, "cause", 256), person, extra)
        if action in (wire.ACTION_WORKORDER_ACTIVATE, wire.ACTION_WORKORDER_CLOSE):
            wo = text_field(body, "work_order")
            fn = (
                store.activate_work_order
                if action == wire.ACTION_WORKORDER_ACTIVATE
                else store.close_work_order
            )
            await asyncio.to_thread(fn, self.journal, via, person, wo)
            state = "active" if action == wire.ACTION_WORKORDER_ACTIVATE else "closed"
            self.bus.publish(wire.EVENT_WORKORDER, {"work_order": wo, "state": state, "by": person.name})
            return {"work_order": wo, "state": state}
        serial = text_field(body, "device_serial")
        reason = text_field(body, "reason", REASON_MAX)
        scrap = action == wire.ACTION_DEVICE_SCRAP
        await asyncio.to_thread(store.scrap if scrap else store.rework, self.journal, via, person, serial, reason,
                                ca=self.issuing_ca)  # fmt: skip
        if self.on_revoked is not None:
            self.on_revoked()  # the old certificate is revoked (a journal trigger): publish it now
        done = "scrapped" if scrap else "reworked"
        self.bus.publish(wire.EVENT_DEVICE, {"device_serial": serial, "action": done, "by": person.name,
                                             "reason": reason})  # fmt: skip
        return {"device_serial": serial, "state": done}

    async def _acknowledge(self, cause: str, person: User, extra: dict[str, Any]) -> dict[str, Any]:
        alarm = self.alarms.get(cause)
        if alarm is None:
            raise ActionError(404, wire.ERR_NOT_FOUND, f"no active alarm {cause[:64]!r}")
        # Audited first: an acknowledgement the log cannot record does not happen.
        await asyncio.to_thread(self.audit.record, person.name, "alarm.acknowledge", {
            "cause": cause, "severity": alarm.severity, "message": alarm.message, **extra,
        })  # fmt: skip
        acked = self.alarms.acknowledge(cause, person.name)
        if acked is None:  # cleared meanwhile
            raise ActionError(404, wire.ERR_NOT_FOUND, f"alarm {cause[:64]!r} cleared meanwhile")
        self.bus.publish(wire.EVENT_ALARM, {"action": "acknowledged", "alarm": acked.snapshot()})
        return {"alarm": acked.snapshot()}
