"""Console sessions: a person logs in once and gets a token that expires; actions carry it in a header.

Tokens are 256-bit random strings, kept in memory only by their SHA-256 (a daemon restart ends every session:
the console logs in again). At most `max_sessions` are open; a new login past that ends the oldest, so a
console left logged in somewhere never locks the others out.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.production.users import User


@dataclass(frozen=True)
class ConsoleSession:
    user: User
    created_at: float
    expires_at: float

    def public(self) -> dict[str, object]:
        return {"user": self.user.name, "role": self.user.role.value, "created_at": self.created_at,
                "expires_at": self.expires_at}  # fmt: skip


def _key(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


class Sessions:
    def __init__(self, ttl_s: float, max_sessions: int, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.clock = clock
        self._open: dict[bytes, ConsoleSession] = {}

    def __len__(self) -> int:
        self._expire()
        return len(self._open)

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, s in self._open.items() if s.expires_at <= now]:
            del self._open[key]

    def open(self, user: User) -> tuple[str, ConsoleSession]:
        self._expire()
        while len(self._open) >= self.max_sessions:
            del self._open[min(self._open, key=lambda k: self._open[k].created_at)]
        now = self.clock()
        token = secrets.token_urlsafe(32)
        session = ConsoleSession(user, now, now + self.ttl_s)
        self._open[_key(token)] = session
        return token, session

    def get(self, token: str) -> ConsoleSession | None:
        session = self._open.get(_key(token))
        if session is None:
            return None
        if session.expires_at <= self.clock():
            del self._open[_key(token)]
            return None
        return session

    def close(self, token: str) -> ConsoleSession | None:
        return self._open.pop(_key(token), None)
