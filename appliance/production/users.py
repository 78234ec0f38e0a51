"""People and roles: per-person accounts, scrypt-hashed passwords or PINs, lockout, and who may do what.

There are no shared logins: every change names the person who made it, and the audit log records that name.
A password is hashed with scrypt at the OWASP Password Storage Cheat Sheet's parameters (N=2**17, r=8, p=1:
128 MiB and about half a second per hash), with a random 16-byte salt, and compared in constant time; a login
that succeeds against a hash made with weaker parameters stores a new hash at the current ones. After
LOCKOUT_FAILURES failed logins in a row an account is locked for LOCKOUT_SECONDS, even for the right password;
every failure and every lockout is audited.
"""

from __future__ import annotations

import base64
import enum
import functools
import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from appliance import names
from appliance.errors import BirthlineError, ReasonCode
from appliance.issuance.journal import Journal
from appliance.production.audit import AuditSink

SALT_BYTES: Final = 16
HASH_BYTES: Final = 32
PASSWORD_MIN: Final = 8
PASSWORD_MAX: Final = 1024
LOCKOUT_FAILURES: Final = 5
LOCKOUT_SECONDS: Final = 300.0


class Role(enum.StrEnum):
    OPERATOR = "operator"
    SUPERVISOR = "supervisor"
    ADMINISTRATOR = "administrator"
    AUDITOR = "auditor"


class Permission(enum.StrEnum):
    USER_MANAGE = "user.manage"  # add, disable, reset another person's password
    SETUP = "setup"  # tenants, products, production lines
    WORK_ORDER = "workorder"  # add, import, activate, close, assign lines
    STATION_ASSIGN = "station.assign"  # station -> production line
    STATION_MANAGE = "station.manage"  # register a station, rotate its credentials
    STATION_DISABLE = "station.disable"  # disable or re-enable a station (a lost or tampered fixture)
    CA_MANAGE = "ca.manage"  # create CAs, import an issuing CA's certificate
    REVOKE = "revoke"  # revoke certificates (a device, a certificate or a whole work order)
    REWORK = "rework"
    SCRAP = "scrap"
    AUDIT_CHECKPOINT = "audit.checkpoint"  # sign the audit log's head now (`birthline audit checkpoint`)
    ISSUE = "issue"  # `birthline issue`: one certificate by hand, acting as a station (the line's work orders apply)
    STATION_PAUSE = "station.pause"  # pause or resume a station's issuance (the console)
    ALARM_ACKNOWLEDGE = "alarm.acknowledge"  # acknowledge an alarm (the console)


# docs/production.md carries the same table; test_users checks they agree.
PERMISSIONS: Final[dict[Permission, frozenset[Role]]] = {
    Permission.USER_MANAGE: frozenset({Role.ADMINISTRATOR}),
    Permission.SETUP: frozenset({Role.ADMINISTRATOR}),
    Permission.WORK_ORDER: frozenset({Role.SUPERVISOR, Role.ADMINISTRATOR}),
    Permission.STATION_ASSIGN: frozenset({Role.SUPERVISOR, Role.ADMINISTRATOR}),
    Permission.STATION_MANAGE: frozenset({Role.ADMINISTRATOR}),
    Permission.STATION_DISABLE: frozenset({Role.SUPERVISOR, Role.ADMINISTRATOR}),
    Permission.CA_MANAGE: frozenset({Role.ADMINISTRATOR}),
    Permission.REVOKE: frozenset({Role.SUPERVISOR}),
    Permission.REWORK: frozenset({Role.SUPERVISOR}),
    Permission.SCRAP: frozenset({Role.SUPERVISOR}),
    Permission.AUDIT_CHECKPOINT: frozenset({Role.AUDITOR, Role.ADMINISTRATOR}),
    # Running the line; a supervisor stands in for an operator. Not administrators: whoever holds the CA keys
    # and accounts does not also mint device identities.
    Permission.ISSUE: frozenset({Role.OPERATOR, Role.SUPERVISOR}),
    Permission.STATION_PAUSE: frozenset({Role.OPERATOR, Role.SUPERVISOR, Role.ADMINISTRATOR}),
    Permission.ALARM_ACKNOWLEDGE: frozenset({Role.OPERATOR, Role.SUPERVISOR, Role.ADMINISTRATOR}),
}


class AuthError(BirthlineError):
    """Login failed, the account is locked or disabled, or the role lacks the permission."""

    def __init__(self, message: str, why: str = "") -> None:
        super().__init__(message, ReasonCode.NOT_AUTHORISED)
        self.why = why or message  # without the name as typed (a console must not show it back)


class UserError(BirthlineError):
    def __init__(self, message: str) -> None:
        super().__init__(message, ReasonCode.BAD_REQUEST)


@dataclass(frozen=True)
class User:
    """An authenticated person. Obtain one from `login` (or `bootstrap`); production changes take it."""

    name: str
    role: Role

    def require(self, permission: Permission) -> None:
        if self.role not in PERMISSIONS[permission]:
            allowed = ", ".join(sorted(PERMISSIONS[permission]))
            raise AuthError(f"{self.name} ({self.role}) may not {permission.value}; that needs: {allowed}")


@dataclass(frozen=True)
class UserInfo:
    name: str
    role: str
    enabled: bool
    failed_logins: int
    locked_until: float | None
    created_at: float
    changed_at: float

    COLUMNS = "name, role, enabled, failed_logins, locked_until, created_at, changed_at"


# -- hashing -------------------------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class ScryptCost:
    """scrypt's work factors. Memory is about 128 * n * r bytes."""

    n: int
    r: int
    p: int

    @property
    def memory(self) -> int:
        """What hashlib.scrypt needs as maxmem (OpenSSL: 128 * r * (n + p + 2) bytes)."""
        return 128 * self.r * (self.n + self.p + 2)

    def weaker_than(self, other: ScryptCost) -> bool:
        return self.n < other.n or self.r < other.r or self.p < other.p


# OWASP Password Storage Cheat Sheet: "scrypt with a minimum CPU/memory cost parameter of (2^17), a minimum block
# size of 8 (1024 bytes), and a parallelization parameter of 1". Every hash the appliance makes uses it: the
# functions below take `cost` only so that a test can pass a cheaper one explicitly; nothing reads it from a
# configuration or the environment.
OWASP_SCRYPT: Final = ScryptCost(2**17, 8, 1)
# A stored hash is data from the journal: refuse to verify one that would take more memory than this (2**18, r=8).
VERIFY_MAX_MEMORY: Final = 128 * 8 * (2**18 + 3)


def hash_password(password: str, *, salt: bytes | None = None, cost: ScryptCost = OWASP_SCRYPT) -> str:
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=cost.n,
        r=cost.r,
        p=cost.p,
        maxmem=cost.memory,
        dklen=HASH_BYTES,
    )
    return f"scrypt${cost.n}${cost.r}${cost.p}${_b64(salt)}${_b64(digest)}"


def stored_cost(stored: str) -> ScryptCost | None:
    """The parameters a stored hash was made with, or None if it is not a usable scrypt hash."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt" or not all(x.isdigit() for x in parts[1:4]):
        return None
    cost = ScryptCost(int(parts[1]), int(parts[2]), int(parts[3]))
    power_of_two = cost.n > 1 and cost.n & (cost.n - 1) == 0
    if not power_of_two or not 1 <= cost.r <= 64 or not 1 <= cost.p <= 16 or cost.memory > VERIFY_MAX_MEMORY:
        return None
    return cost


def verify_password(password: str, stored: str) -> bool:
    cost = stored_cost(stored)
    if cost is None:
        return False
    try:
        salt, digest = stored.split("$")[4:6]
        want = base64.b64decode(digest, validate=True)
        if not 16 <= len(want) <= 64:
            return False
        got = hashlib.scrypt(
            password.encode("utf-8"),
            salt=base64.b64decode(salt, validate=True),
            n=cost.n,
            r=cost.r,
            p=cost.p,
            maxmem=cost.memory,
            dklen=len(want),
        )
    except (ValueError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(got, want)


@functools.lru_cache(maxsize=4)
def _dummy_hash(cost: ScryptCost) -> str:
    """Verified when the name is unknown, so a wrong name costs as much time as a wrong password. Made on first
    use, not at import: every `birthline` command imports this module, few log in."""
    return hash_password("birthline-no-such-user", salt=b"\0" * SALT_BYTES, cost=cost)


def check_new_password(password: str) -> None:
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise UserError(f"a password or PIN is {PASSWORD_MIN}..{PASSWORD_MAX} characters")


# -- accounts --------------------------------------------------------------------------------------------------------
def list_users(journal: Journal) -> list[UserInfo]:
    def q() -> list[UserInfo]:
        rows = journal.conn.execute(f"SELECT {UserInfo.COLUMNS} FROM users ORDER BY name").fetchall()
        return [
            UserInfo(str(a), str(b), bool(c), int(d), e, float(f), float(g)) for a, b, c, d, e, f, g in rows
        ]

    return journal.call(q)


def _insert(conn: sqlite3.Connection, name: str, role: Role, password_hash: str, at: float) -> None:
    if conn.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone():
        raise UserError(f"a user named {name!r} already exists")
    conn.execute(
        "INSERT INTO users (name, role, password_hash, enabled, failed_logins, created_at, changed_at)"
        " VALUES (?,?,?,1,0,?,?)",
        (name, role.value, password_hash, at, at),
    )


def bootstrap(
    journal: Journal, audit: AuditSink, name: str, password: str, *, cost: ScryptCost = OWASP_SCRYPT
) -> User:
    """Create the first administrator; refused once any user exists."""
    names.USER.check(name)
    check_new_password(password)
    pw_hash = hash_password(password, cost=cost)

    def txn(conn: sqlite3.Connection) -> None:
        if conn.execute("SELECT 1 FROM users LIMIT 1").fetchone():
            raise UserError("users already exist: --bootstrap only creates the first administrator")
        _insert(conn, name, Role.ADMINISTRATOR, pw_hash, time.time())
        audit.append(conn, name, "user.bootstrap", {"user": name, "role": Role.ADMINISTRATOR.value})

    journal.call(journal.transaction, txn, "creating the first administrator")
    return User(name, Role.ADMINISTRATOR)


def add_user(
    journal: Journal,
    audit: AuditSink,
    actor: User,
    name: str,
    role: Role,
    password: str,
    *,
    cost: ScryptCost = OWASP_SCRYPT,
) -> None:
    actor.require(Permission.USER_MANAGE)
    names.USER.check(name)
    check_new_password(password)
    pw_hash = hash_password(password, cost=cost)

    def txn(conn: sqlite3.Connection) -> None:
        _insert(conn, name, role, pw_hash, time.time())
        audit.append(conn, actor.name, "user.add", {"user": name, "role": role.value})

    journal.call(journal.transaction, txn, f"adding user {name}")


def set_enabled(journal: Journal, audit: AuditSink, actor: User, name: str, enabled: bool) -> None:
    actor.require(Permission.USER_MANAGE)
    if name == actor.name and not enabled:
        raise UserError("you cannot disable your own account")

    def txn(conn: sqlite3.Connection) -> None:
        cur = conn.execute(
            "UPDATE users SET enabled=?, failed_logins=0, locked_until=NULL, changed_at=? WHERE name=?",
            (int(enabled), time.time(), name),
        )
        if cur.rowcount != 1:
            raise UserError(f"no user named {name!r}")
        audit.append(conn, actor.name, "user.enable" if enabled else "user.disable", {"user": name})

    journal.call(journal.transaction, txn, f"{'enabling' if enabled else 'disabling'} user {name}")


def set_password(
    journal: Journal,
    audit: AuditSink,
    actor: User,
    name: str,
    password: str,
    *,
    cost: ScryptCost = OWASP_SCRYPT,
) -> None:
    """Anyone may change their own password (they logged in with the old one); administrators anyone's."""
    if name != actor.name:
        actor.require(Permission.USER_MANAGE)
    check_new_password(password)
    pw_hash = hash_password(password, cost=cost)

    def txn(conn: sqlite3.Connection) -> None:
        cur = conn.execute(
            "UPDATE users SET password_hash=?, failed_logins=0, locked_until=NULL, changed_at=? WHERE name=?",
            (pw_hash, time.time(), name),
        )
        if cur.rowcount != 1:
            raise UserError(f"no user named {name!r}")
        audit.append(conn, actor.name, "user.passwd", {"user": name})

    journal.call(journal.transaction, txn, f"setting the password of {name}")


# -- login -----------------------------------------------------------------------------------------------------------
def login(
    journal: Journal,
    audit: AuditSink,
    name: str,
    password: str,
    *,
    clock: Callable[[], float] = time.time,
    cost: ScryptCost = OWASP_SCRYPT,
) -> User:
    """Check a password; audit the outcome; lock the account after LOCKOUT_FAILURES failures in a row. A right
    password whose stored hash is weaker than `cost` is hashed again at `cost` and stored (audited as
    `rehashed` in login.success), so accounts move to the current parameters as people log in.

    The slow hashes run outside any transaction (so a login never holds the journal's write lock); the
    counter update, the new hash and the audit entry are one transaction.
    """

    def read() -> tuple[str, str, int, float | None] | None:
        row = journal.conn.execute(
            "SELECT role, password_hash, enabled, locked_until FROM users WHERE name=?", (name,)
        ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), int(row[2]), row[3])

    found = journal.call(read)
    stored = found[1] if found else _dummy_hash(cost)
    ok = verify_password(password, stored) and found is not None
    old_cost = stored_cost(stored)
    rehash = hash_password(password, cost=cost) if ok and old_cost and old_cost.weaker_than(cost) else None
    now = clock()
    actor = name if names.USER.problem(name) is None else "unknown"

    def txn(conn: sqlite3.Connection) -> tuple[User | None, str]:
        row = conn.execute(
            "SELECT role, enabled, failed_logins, locked_until FROM users WHERE name=?", (name,)
        ).fetchone()
        if row is None:
            audit.append(conn, actor, "login.failure", {"user": actor, "why": "unknown user"})
            return None, "unknown user or wrong password"
        role, enabled, failures, locked_until = str(row[0]), bool(row[1]), int(row[2]), row[3]
        if not enabled:
            audit.append(conn, name, "login.failure", {"user": name, "why": "account disabled"})
            return None, "account disabled"
        if locked_until is not None and now < float(locked_until):
            audit.append(
                conn, name, "login.failure", {"user": name, "why": "locked", "locked_until": locked_until}
            )
            return (
                None,
                f"account locked for another {float(locked_until) - now:.0f} s after repeated failures",
            )
        if ok:
            conn.execute("UPDATE users SET failed_logins=0, locked_until=NULL WHERE name=?", (name,))
            data: dict[str, object] = {"user": name, "role": role}
            # Only over the hash just verified: a password changed meanwhile is not overwritten.
            if (
                rehash is not None
                and conn.execute(
                    "UPDATE users SET password_hash=? WHERE name=? AND password_hash=?",
                    (rehash, name, stored),
                ).rowcount
            ):
                data["rehashed"] = {"from": stored.rsplit("$", 2)[0], "to": rehash.rsplit("$", 2)[0]}
            audit.append(conn, name, "login.success", data)
            return User(name, Role(role)), ""
        failures += 1
        lock = now + LOCKOUT_SECONDS if failures >= LOCKOUT_FAILURES else None
        conn.execute(
            "UPDATE users SET failed_logins=?, locked_until=? WHERE name=?",
            (0 if lock else failures, lock, name),
        )
        audit.append(
            conn, name, "login.failure", {"user": name, "why": "wrong password", "failures": failures}
        )
        if lock is not None:
            audit.append(conn, name, "login.lockout", {"user": name, "locked_until": lock})
        return None, "unknown user or wrong password"

    result: tuple[User | None, str] = journal.call(journal.transaction, txn, "recording a login")
    user, why = result
    if user is None:
        raise AuthError(f"login refused for {name!r}: {why}", why)
    return user
