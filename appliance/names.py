"""What each kind of name may be: one rule per kind, and the only place those rules are written.

Every entry point checks its names against these rules: the command line (argparse types in
appliance/cli/argtypes.py), MES imports (production/model.py), the core that stores them (production/store.py,
production/users.py, stations_registry.py, ca/hierarchy.py, the issuance profiles) and the configuration
(config.py: CA names; config_frontends.py: station and CMP, SCEP and EST label names; profiles/config.py:
profile names).

Names end up in file names (credential bundles), URLs (/crl/<ca>.crl, /.well-known/cmp/p/<label>),
spreadsheets (exports), terminals, logs and the audit log. So each rule is a whitelist of ASCII characters
that starts with a letter or a digit: no '..' or '/', no control, escape, NUL, bidi or other non-ASCII
character, nothing a spreadsheet reads as a formula ('=', '+', '-', '@' first), nothing an argument parser reads
as an option ('-' first), and at most 64 characters. A refusal names the field and the rule, and shows the
value escaped (appliance.text.safe_repr).

Two kinds are not identifiers. Device serials are X.520 PrintableString (the certificate's serialNumber), which
allows '=', '+' and '-' first: exports neutralise those (production/reconcile.py). Free text (a display name,
a description, a reason) may be any printable Unicode, but never control, format (bidi), surrogate or
unassigned characters, and is bounded in length.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from appliance.errors import BirthlineError, ReasonCode
from appliance.text import PRINTABLE, is_clean_text, safe_repr

NAME_MAX: Final = 64
DEVICE_SERIAL_MAX: Final = 64
TEXT_MAX: Final = 256
PORT_MAX: Final = 255


class InvalidName(BirthlineError):
    """A name (or a free-text field) that breaks its kind's rule; the message names the field and the rule."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message, ReasonCode.BAD_REQUEST, {"field": field})
        self.field = field

    def __str__(self) -> str:
        return self.message


class _Checks:
    """`check`: the value if it is allowed, else InvalidName naming the field and the rule."""

    field: str

    def problem(self, value: object) -> str | None:
        raise NotImplementedError

    def check(self, value: object) -> str:
        problem = self.problem(value)
        if problem is not None:
            raise InvalidName(problem, self.field)
        assert isinstance(value, str)
        return value


@dataclass(frozen=True)
class Rule(_Checks):
    """A kind of name: its field (for messages), the rule in words, and the pattern the whole value matches."""

    field: str
    rule: str
    pattern: re.Pattern[str]

    def problem(self, value: object) -> str | None:
        """What is wrong with `value`, naming the field and the rule, or None."""
        if not isinstance(value, str):
            return f"{self.field} must be text, not {type(value).__name__}"
        if self.pattern.fullmatch(value) is None:
            return f"{self.field} {safe_repr(value)} is not allowed: {self.rule}"
        return None


def _identifier(field: str, extra: str, *, first: str = "A-Za-z0-9", lower: bool = False) -> Rule:
    letters = "a-z" if lower else "A-Z a-z"
    shown = " ".join(extra)
    starts = "a lowercase letter" if lower else "a letter or a digit"
    return Rule(
        field,
        f"1..{NAME_MAX} characters from {letters} 0-9 {shown}, starting with {starts}",
        re.compile(f"[{first}][{'a-z' if lower else 'A-Za-z'}0-9{re.escape(extra)}]{{0,{NAME_MAX - 1}}}"),
    )


WORK_ORDER_ID: Final = _identifier("work order id", "._:-")
STATION: Final = _identifier("station name", "._:-")
LINE: Final = _identifier("line name", "._:-")
TENANT: Final = _identifier("tenant name", "._:-")
PRODUCT: Final = _identifier("product name", "._:-")
# CA names are also HSM key labels (ca:<name>) and URL path segments (/crl/<name>.crl): no ':'.
CA: Final = _identifier("CA name", "._-")
PROFILE: Final = _identifier("profile name", "_-")
CMP_LABEL: Final = _identifier("CMP label", "._-")
SCEP_LABEL: Final = _identifier("SCEP label", "._-")
EST_LABEL: Final = _identifier("EST label", "._-")
USER: Final = _identifier("user name", "._-", first="a-z", lower=True)


@dataclass(frozen=True)
class DeviceSerialRule(Rule):
    """X.520 PrintableString, 1..64 characters, no leading or trailing space (invisible on screens and labels,
    and X.520 matching folds them away: two serials differing only there would name the same device)."""

    def problem(self, value: object, limit: int = DEVICE_SERIAL_MAX) -> str | None:
        if not isinstance(value, str):
            return f"{self.field} must be text, not {type(value).__name__}"
        why = None
        if not value:
            why = f"{self.field} is empty"
        elif len(value) > limit:
            why = f"{self.field} is {len(value)} characters long; at most {limit} allowed"
        elif any(ch not in PRINTABLE for ch in value):
            bad = next(ch for ch in value if ch not in PRINTABLE)
            why = f"{self.field} has character {safe_repr(bad)} outside PrintableString"
        elif value != value.strip(" "):
            why = f"{self.field} has leading or trailing spaces"
        return None if why is None else f"{why}: {safe_repr(value)} ({self.rule})"


DEVICE_SERIAL: Final = DeviceSerialRule(
    "device serial",
    f"1..{DEVICE_SERIAL_MAX} PrintableString characters (A-Z a-z 0-9 space ' ( ) + , - . / : = ?),"
    " no leading or trailing space",
    re.compile(r"[A-Za-z0-9'()+,\-./:=?](?:[A-Za-z0-9 '()+,\-./:=?]{0,62}[A-Za-z0-9'()+,\-./:=?])?"),
)


@dataclass(frozen=True)
class PortRule(Rule):
    """A serial port: an absolute device path of printable ASCII, without '.' or '..' components."""

    def problem(self, value: object) -> str | None:
        found = super().problem(value)
        if found is None and isinstance(value, str) and any(p in (".", "..") for p in value.split("/")):
            found = f"{self.field} {safe_repr(value)} is not allowed: {self.rule}"
        return found


SERIAL_PORT: Final = PortRule(
    "serial port",
    f"an absolute path of 2..{PORT_MAX} printable ASCII characters, no spaces, no '.' or '..' components"
    " (e.g. /dev/serial/by-path/...)",
    re.compile(f"/[!-~]{{1,{PORT_MAX - 1}}}"),
)


@dataclass(frozen=True)
class HostRule(_Checks):
    """A name the appliance answers to on the network, as it goes into its TLS server certificate: a DNS name
    (RFC 1123 labels of letters, digits and '-', not starting or ending with '-'; no wildcard, no final dot) or an
    IPv4 or IPv6 address."""

    field: str
    rule: str = (
        "a DNS name (labels of 1..63 letters, digits and '-', not at either end; 253 characters at most; no"
        " wildcard) or an IPv4 or IPv6 address"
    )

    def problem(self, value: object) -> str | None:
        if not isinstance(value, str):
            return f"{self.field} must be text, not {type(value).__name__}"
        try:
            ipaddress.ip_address(value)
        except ValueError:
            pass
        else:
            return None
        labels = value.split(".")
        if (
            not value
            or len(value) > HOST_MAX
            or value.replace(".", "").isdigit()  # all-numeric: a mistyped address, never a DNS name here
            or not all(_LABEL.fullmatch(label) for label in labels)
        ):
            return f"{self.field} {safe_repr(value)} is not allowed: {self.rule}"
        return None


HOST_MAX: Final = 253
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
HOST: Final = HostRule("network name")


@dataclass(frozen=True)
class TextRule(_Checks):
    """Free text (display names, descriptions, reasons): printable Unicode, bounded, and never control, format
    (bidi), surrogate or unassigned characters."""

    field: str
    required: bool = False
    max_len: int = TEXT_MAX

    @property
    def rule(self) -> str:
        least = 1 if self.required else 0
        return f"{least}..{self.max_len} characters, no control, escape or bidi characters"

    def problem(self, value: object) -> str | None:
        if not isinstance(value, str):
            return f"{self.field} must be text, not {type(value).__name__}"
        if (self.required and not value.strip()) or len(value) > self.max_len or not is_clean_text(value):
            return f"{self.field} {safe_repr(value)} is not allowed: {self.rule}"
        return None


DISPLAY_NAME: Final = TextRule("display name")
DESCRIPTION: Final = TextRule("description")
REASON: Final = TextRule("reason", required=True)
