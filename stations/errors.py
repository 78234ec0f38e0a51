"""The single error root of the stations package.

Every error carries the code that goes on the wire, so a server can turn any ``StationError`` straight into an
ERROR frame without a mapping table of its own.
"""

from __future__ import annotations

from stations.codes import Code


class StationError(Exception):
    """Root of every error the stations package raises on purpose."""

    def __init__(self, code: Code, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text

    def __str__(self) -> str:
        return f"{self.code.name.lower()}: {self.text}"


class GaveUp(StationError):
    """The fixture library stopped retrying (``give_up_after``): code TIMEOUT, and the text names the last answer
    it was retrying on (``last_code``, ``last_text``), so a fixture shows why, not only that it gave up."""

    def __init__(self, text: str, last_code: Code | int | None = None, last_text: str = "") -> None:
        super().__init__(Code.TIMEOUT, text)
        self.last_code = last_code
        self.last_text = last_text


class MessageError(StationError):
    """A message body does not decode or a field is out of bounds (the code says which rule)."""


class SessionError(StationError):
    """The local caller used a session out of order (sending before authentication, counter exhausted)."""
