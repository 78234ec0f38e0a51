"""WorkOrderPolicy: the core's AuthorisationPolicy for production lines, work orders, allowlists and quotas.

It runs inside the intent transaction on the journal thread (BEGIN IMMEDIATE: one writer at a time), in the
core's SAVEPOINT for this request. The rules, in order, each with its own refusal (docs/production.md):

1. the station is on a production line                                     NOT_AUTHORISED
2. an active work order on that line is for this profile and issuing CA    NOT_AUTHORISED
3. ... and is valid now (valid_from <= now < valid_to)                     NOT_AUTHORISED
4. the device serial is in that work order's allowlist                     NOT_AUTHORISED (or a rework grant)
5. the key algorithm is in the product's key policy                        KEY_POLICY
6. a unit is left: UPDATE work_order SET consumed = consumed + 1
   WHERE id = ? AND consumed < quantity changed one row                    QUOTA_EXHAUSTED

The unit row written here is bound to the intent by a trigger; a refusal later in the same request (or of this
one) rolls both back with the SAVEPOINT, and a burned intent gives its unit back by trigger in the burn's own
transaction (crash recovery included), so work_order.consumed always equals the live 'new' units.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from appliance.errors import IssuanceRefused, ReasonCode
from appliance.issuance.journal import work_order_of
from appliance.issuance.policy import Grant, IssueRequest
from appliance.production.allowlist import pattern_matches
from appliance.production.model import iso
from appliance.profiles import Profile

_EC = {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}


def _refuse(message: str, rule: str, **details: Any) -> IssuanceRefused:
    return IssuanceRefused(message, ReasonCode.NOT_AUTHORISED, {"rule": rule, **details})


def key_algorithm(csr: bytes, public_key_der: bytes | None = None) -> str:
    """The profile-style name of the request's key: the CSR's, or `public_key_der` (SPKI) when given (the core
    validated either already)."""
    key: PublicKeyTypes
    if public_key_der is not None:
        key = serialization.load_der_public_key(public_key_der)
    else:
        req = x509.load_pem_x509_csr(csr) if csr.startswith(b"-----BEGIN") else x509.load_der_x509_csr(csr)
        key = req.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _EC.get(key.curve.name, f"ec-{key.curve.name}")
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    return "unknown"


@dataclass(frozen=True)
class _Candidate:
    id: str
    quantity: int
    consumed: int
    pattern: str | None
    valid_from: float | None
    valid_to: float | None
    profile: str
    ca: str
    key_algorithms: frozenset[str]
    mode: str = "local"
    product: str = ""


class WorkOrderPolicy:
    """Authorise a request against the work orders of the requesting station's line.

    `ca` is the name of the issuing CA the service signs with: a product of another CA is never authorised here.
    """

    def __init__(self, ca: str, *, clock: Callable[[], float] = time.time) -> None:
        self.ca = ca
        self.clock = clock
        # Per-transaction caches (see begin): what a batch's requests share, read once per group commit.
        self._lines: dict[str, str | None] = {}
        self._orders: dict[str, list[_Candidate]] = {}
        self._ranges: dict[str, list[tuple[str, int, int, int]]] = {}

    def begin(self, conn: sqlite3.Connection) -> None:
        self._lines.clear()
        self._orders.clear()
        self._ranges.clear()

    def _line(self, conn: sqlite3.Connection, station: str) -> str | None:
        if station not in self._lines:
            row = conn.execute("SELECT line FROM stations WHERE name=?", (station,)).fetchone()
            self._lines[station] = None if row is None or row[0] is None else str(row[0])
        return self._lines[station]

    def _candidates(self, conn: sqlite3.Connection, line: str) -> list[_Candidate]:
        # `consumed` is read here only for messages; the quota itself is the conditional UPDATE below.
        if line not in self._orders:
            rows = conn.execute(
                "SELECT w.id, w.quantity, w.consumed, w.pattern, w.valid_from, w.valid_to, p.profile, p.ca,"
                " p.key_algorithms, p.issuance_mode, w.product FROM work_order_line l JOIN work_order w ON w.id = l.work_order"
                " JOIN product p ON p.name = w.product WHERE l.line = ? AND w.state = 'active'"
                " ORDER BY w.valid_from IS NOT NULL, w.valid_from, w.created_at, w.id",
                (line,),
            ).fetchall()
            self._orders[line] = [
                _Candidate(a, b, c, d, e, f, g, h, frozenset(str(k).split(",")), str(m), str(p))
                for a, b, c, d, e, f, g, h, k, m, p in rows
            ]
        return self._orders[line]

    def authorise(self, conn: sqlite3.Connection, request: IssueRequest, profile: Profile) -> Grant:
        serial = request.device_serial
        line = self._line(conn, request.station)
        if line is None:
            raise _refuse(f"station {request.station!r} is not assigned to a production line", "station-line")
        orders = self._candidates(conn, line)
        if request.work_order is not None:
            orders = [o for o in orders if o.id == request.work_order]
            if not orders:
                raise _refuse(f"work order {request.work_order!r}, the only one this request's credential is good"
                              f" for, is not active on line {line!r}", "credential-work-order", line=line)  # fmt: skip
        if not orders:
            raise _refuse(f"no active work order on line {line!r}", "active-work-order", line=line)
        orders = [o for o in orders if o.profile == profile.name and o.ca == self.ca]
        if not orders:
            raise _refuse(
                f"no active work order on line {line!r} is for profile {profile.name!r} from CA {self.ca!r}",
                "active-work-order",
                line=line,
            )
        now = self.clock()
        valid = [
            o
            for o in orders
            if (o.valid_from is None or o.valid_from <= now) and (o.valid_to is None or now < o.valid_to)
        ]
        if not valid:
            raise _refuse(self._window_text(orders, now, line), "validity", line=line)
        grant = conn.execute(
            "SELECT id, work_order FROM rework WHERE ca=? AND device_serial=? AND used=0", (self.ca, serial)
        ).fetchone()
        if grant is not None:
            return self._rework(conn, request, profile, valid, int(grant[0]), str(grant[1]), line, now)
        allowed = [o for o in valid if self._allows(conn, o, serial)]
        if not allowed:
            names = ", ".join(o.id for o in valid)
            raise _refuse(
                f"device serial {serial!r} is not in the allowlist of work order(s) {names} on line {line!r}",
                "allowlist",
                line=line,
            )
        self._check_key(request, allowed, profile)
        for order in allowed:
            # RETURNING: the units left come with the update, so the core can warn a supervisor before the
            # order runs dry without another query per certificate.
            taken = conn.execute(
                "UPDATE work_order SET consumed = consumed + 1 WHERE id = ? AND consumed < quantity"
                " RETURNING quantity - consumed, quantity",
                (order.id,),
            ).fetchone()
            if taken is not None:
                conn.execute(
                    "INSERT INTO work_order_unit (work_order, device_serial, kind, created_at) VALUES (?,?,'new',?)",
                    (order.id, serial, now),
                )
                return Grant(
                    order.mode,
                    order.id,
                    remaining=int(taken[0]),
                    quantity=int(taken[1]),
                    product=order.product,
                )
        names = ", ".join(f"{o.id} (all {o.quantity} used)" for o in allowed)
        raise IssuanceRefused(
            f"no units left on work order {names}",
            ReasonCode.QUOTA_EXHAUSTED,
            {"work_orders": [o.id for o in allowed]},
        )

    def authorise_update(
        self, conn: sqlite3.Connection, request: IssueRequest, profile: Profile, updates: int
    ) -> Grant:
        """A key update (CMP kur) of the device's current certificate, row `updates`: no unit is taken and the work
        order need not be active any more (a device updates its key in the field, long after its run); the
        product the device was made under decides the key policy."""
        work_order = work_order_of(conn, updates)
        product = None
        if work_order is not None:
            product = conn.execute(
                "SELECT p.key_algorithms, p.profile, p.ca, p.name FROM work_order w JOIN product p ON p.name = w.product"
                " WHERE w.id = ?",
                (work_order,),
            ).fetchone()
        if product is None:
            raise _refuse(
                f"no work order or product is recorded for the certificate of {request.device_serial!r}:"
                " its key cannot be updated here",
                "key-update-product",
            )
        if product[2] != self.ca or product[1] != profile.name:
            raise _refuse(
                f"the product of {request.device_serial!r} is certified by profile {product[1]!r} of CA"
                f" {product[2]!r}, not {profile.name!r} of {self.ca!r}",
                "key-update-product",
            )
        allowed = frozenset(str(product[0]).split(","))
        candidate = _Candidate(str(work_order), 0, 0, None, None, None, profile.name, self.ca, allowed)
        self._check_key(request, [candidate], profile)
        return Grant("local", str(work_order), product=str(product[3]))

    def authorise_retry(
        self, conn: sqlite3.Connection, request: IssueRequest, unit: str, row_id: int
    ) -> None:
        """A station other than the one it was issued to asks for a stored certificate: only a station on a line
        of that certificate's work order gets it (and may then confirm it), whatever the order's state now."""
        assert unit in ("issuance_id", "ra_request_id")
        line = self._line(conn, request.station)
        on_line = (
            line is not None
            and conn.execute(
                f"SELECT 1 FROM work_order_unit u JOIN work_order_line l ON l.work_order = u.work_order"
                f" WHERE u.{unit} = ? AND l.line = ?",
                (row_id, line),
            ).fetchone()
        )
        if not on_line:
            raise _refuse(
                f"device {request.device_serial!r} was certified for a work order that station"
                f" {request.station!r} does not serve",
                "retry-line",
            )

    # -- helpers -------------------------------------------------------------------------------------------------------
    @staticmethod
    def _window_text(orders: Sequence[_Candidate], now: float, line: str) -> str:
        parts = []
        for o in orders:
            if o.valid_from is not None and now < o.valid_from:
                parts.append(f"{o.id} is not valid until {iso(o.valid_from)}")
            else:
                parts.append(f"{o.id} expired at {iso(o.valid_to)}")
        return f"no work order on line {line!r} is valid now: " + "; ".join(parts)

    def _allows(self, conn: sqlite3.Connection, order: _Candidate, serial: str) -> bool:
        if conn.execute(
            "SELECT 1 FROM work_order_serial WHERE work_order=? AND serial=?", (order.id, serial)
        ).fetchone():
            return True
        if order.id not in self._ranges:
            self._ranges[order.id] = conn.execute(
                "SELECT prefix, first, last, width FROM work_order_range WHERE work_order=?", (order.id,)
            ).fetchall()
        for prefix, first, last, width in self._ranges[order.id]:
            if len(serial) == len(prefix) + width and serial.startswith(prefix):
                digits = serial[len(prefix) :]
                if digits.isascii() and digits.isdigit() and first <= int(digits) <= last:
                    return True
        return order.pattern is not None and pattern_matches(order.pattern, serial)

    @staticmethod
    def _check_key(request: IssueRequest, orders: Sequence[_Candidate], profile: Profile) -> None:
        allowed = frozenset[str]().union(*(o.key_algorithms for o in orders))
        if allowed >= profile.key_algorithms:
            return  # the core already held the key to the profile's list: no need to parse the CSR again
        name = key_algorithm(request.csr, request.public_key_der)
        if name not in allowed:
            raise IssuanceRefused(
                f"key algorithm {name} is not in the product's key policy ({', '.join(sorted(allowed))})",
                ReasonCode.KEY_POLICY,
                {"key_algorithm": name, "allowed": sorted(allowed)},
            )

    def _rework(
        self,
        conn: sqlite3.Connection,
        request: IssueRequest,
        profile: Profile,
        valid: Sequence[_Candidate],
        grant_id: int,
        work_order: str,
        line: str,
        now: float,
    ) -> Grant:
        """A supervisor's rework grant: one new issuance for this serial, without taking another unit."""
        order = next((o for o in valid if o.id == work_order), None)
        if order is None:
            raise _refuse(
                f"rework of {request.device_serial!r} is authorised for work order {work_order!r}, which is not"
                f" active and valid on line {line!r}",
                "rework-work-order",
                line=line,
            )
        self._check_key(request, [order], profile)
        conn.execute("UPDATE rework SET used=1 WHERE id=? AND used=0", (grant_id,))
        conn.execute(
            "INSERT INTO work_order_unit (work_order, device_serial, kind, rework_id, created_at)"
            " VALUES (?,?,'rework',?,?)",
            (order.id, request.device_serial, grant_id, now),
        )
        return Grant(order.mode, order.id, product=order.product)
