"""Storage of the production model in the journal, every change with its audit entry in the same transaction.

Each change takes the authenticated `User` who makes it, checks the role (users.PERMISSIONS) and appends an
audit event naming that person before COMMIT: if the audit entry cannot be written, the change does not happen.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from appliance import names
from appliance.errors import Problem
from appliance.issuance.journal import Journal, work_order_of
from appliance.production.allowlist import SerialRange
from appliance.production.audit import AuditSink
from appliance.production.model import (
    ISSUANCE_MODES,
    Line,
    Product,
    ProductionError,
    Tenant,
    WorkOrder,
    WorkOrderSpec,
    iso,
    parse_import,
    spec_problems,
)
from appliance.production.users import Permission, User
from appliance.profiles import Profile
from appliance.text import safe_repr

T = TypeVar("T")


def _change(
    journal: Journal,
    audit: AuditSink,
    actor: User,
    permission: Permission,
    event: str,
    doing: str,
    fn: Callable[[sqlite3.Connection], Mapping[str, Any]],
) -> None:
    """Check the role, run fn in one transaction, and audit what fn returns as the event data."""
    actor.require(permission)

    def txn(conn: sqlite3.Connection) -> None:
        data = fn(conn)
        audit.append(conn, actor.name, event, data)

    journal.call(journal.transaction, txn, doing)


def _read(journal: Journal, fn: Callable[[sqlite3.Connection], T]) -> T:
    return journal.call(lambda: fn(journal.conn))


# -- tenants, products, lines ------------------------------------------------------------------------------------------
def add_tenant(journal: Journal, audit: AuditSink, actor: User, name: str, display_name: str = "") -> None:
    names.TENANT.check(name)
    names.DISPLAY_NAME.check(display_name)

    def fn(conn: sqlite3.Connection) -> Mapping[str, Any]:
        if conn.execute("SELECT 1 FROM tenant WHERE name=?", (name,)).fetchone():
            raise ProductionError(f"tenant {name!r} already exists")
        conn.execute(
            "INSERT INTO tenant (name, display_name, created_at) VALUES (?,?,?)",
            (name, display_name or name, time.time()),
        )
        return {"tenant": name, "display_name": display_name or name}

    _change(journal, audit, actor, Permission.SETUP, "tenant.add", f"adding tenant {name}", fn)


def list_tenants(journal: Journal) -> list[Tenant]:
    return _read(
        journal,
        lambda c: [
            Tenant(*r) for r in c.execute("SELECT name, display_name, created_at FROM tenant ORDER BY name")
        ],
    )


def add_product(
    journal: Journal,
    audit: AuditSink,
    actor: User,
    name: str,
    *,
    tenant: str,
    profile: Profile,
    ca: str,
    key_algorithms: Sequence[str] = (),
    issuance_mode: str = "local",
    revoke_on_update: bool = False,
) -> None:
    """A product of `tenant`, certified with `profile` by issuing CA `ca`; key_algorithms narrows the profile's.
    `issuance_mode` 'upstream' makes the appliance an RA for it: the upstream CA issues (docs/cmp.md).
    `revoke_on_update`: a key update (CMP kur) revokes the certificate it replaces once the new one is confirmed."""
    names.PRODUCT.check(name)
    names.TENANT.check(tenant)
    names.CA.check(ca)
    _check_mode(issuance_mode)
    algs = frozenset(key_algorithms) if key_algorithms else profile.key_algorithms
    extra = sorted(algs - profile.key_algorithms)
    if extra:
        raise ProductionError(
            f"key algorithm(s) {', '.join(map(safe_repr, extra))} are not allowed by profile {profile.name}"
            f" ({', '.join(sorted(profile.key_algorithms))})"
        )

    def fn(conn: sqlite3.Connection) -> Mapping[str, Any]:
        if conn.execute("SELECT 1 FROM product WHERE name=?", (name,)).fetchone():
            raise ProductionError(f"product {name!r} already exists")
        if not conn.execute("SELECT 1 FROM tenant WHERE name=?", (tenant,)).fetchone():
            raise ProductionError(f"no tenant named {tenant!r}")
        row = conn.execute("SELECT role FROM ca WHERE name=?", (ca,)).fetchone()
        if row is None or row[0] != "issuing":
            raise ProductionError(f"{ca!r} is not an issuing CA on this appliance (see birthline ca list)")
        conn.execute(
            "INSERT INTO product (name, tenant, profile, ca, key_algorithms, created_at, issuance_mode,"
            " revoke_on_update) VALUES (?,?,?,?,?,?,?,?)",
            (name, tenant, profile.name, ca, ",".join(sorted(algs)), time.time(), issuance_mode,
             int(revoke_on_update)),
        )  # fmt: skip
        return {
            "product": name,
            "tenant": tenant,
            "profile": profile.name,
            "ca": ca,
            "key_algorithms": sorted(algs),
            "issuance_mode": issuance_mode,
            "revoke_on_update": revoke_on_update,
        }

    _change(journal, audit, actor, Permission.SETUP, "product.add", f"adding product {name}", fn)


def _check_mode(mode: str) -> None:
    if mode not in ISSUANCE_MODES:
        raise ProductionError(f"issuance mode must be one of {', '.join(ISSUANCE_MODES)}, not {mode!r}")


def set_product_mode(journal: Journal, audit: AuditSink, actor: User, name: str, issuance_mode: str) -> None:
    """Switch a product between local issuance and RA mode. Requests already pending upstream stay pending;
    new requests follow the new mode."""
    _check_mode(issuance_mode)

    def fn(conn: sqlite3.Connection) -> Mapping[str, Any]:
        row = conn.execute("SELECT issuance_mode FROM product WHERE name=?", (name,)).fetchone()
        if row is None:
            raise ProductionError(f"no product named {name!r}")
        conn.execute("UPDATE product SET issuance_mode=? WHERE name=?", (issuance_mode, name))
        return {"product": name, "from": row[0], "to": issuance_mode}

    _change(journal, audit, actor, Permission.SETUP, "product.mode", f"changing the mode of {name}", fn)


def set_product_key_update(journal: Journal, audit: AuditSink, actor: User, name: str, revoke: bool) -> None:
    """Whether a key update (CMP kur) of this product's devices revokes the certificate it replaces (reason
    superseded, once the new one is confirmed) or leaves it valid until it expires. Applies to confirmations from
    now on."""

    def fn(conn: sqlite3.Connection) -> Mapping[str, Any]:
        row = conn.execute("SELECT revoke_on_update FROM product WHERE name=?", (name,)).fetchone()
        if row is None:
            raise ProductionError(f"no product named {name!r}")
        conn.execute("UPDATE product SET revoke_on_update=? WHERE name=?", (int(revoke), name))
        return {"product": name, "from": bool(row[0]), "revoke_on_update": revoke}

    _change(
        journal, audit, actor, Permission.SETUP, "product.key-update", f"changing key updates of {name}", fn
    )


def _product(row: Sequence[Any]) -> Product:
    name, tenant, profile, ca, algs, created, mode, revoke = row
    return Product(name, tenant, profile, ca, frozenset(a for a in str(algs).split(",") if a), created, mode,
                   bool(revoke))  # fmt: skip


def list_products(journal: Journal) -> list[Product]:
    return _read(
        journal,
        lambda c: [
            _product(r)
            for r in c.execute(
                "SELECT name, tenant, profile, ca, key_algorithms, created_at, issuance_mode, revoke_on_update"
                " FROM product ORDER BY name"
            )
        ],
    )


def add_line(journal: Journal, audit: AuditSink, actor: User, name: str, description: str = "") -> None:
    names.LINE.check(name)
    names.DESCRIPTION.check(description)

    def fn(conn: sqlite3.Connection) -> Mapping[str, Any]:
        if conn.execute("SELECT 1 FROM production_line WHERE name=?", (name,)).fetchone():
            raise ProductionError(f"line {name!r} already exists")
        conn.execute(
            "INSERT INTO production_line (name, description, created_at) VALUES (?,?,?)",
            (name, description, time.time()),
        )
        return {"line": name, "description": description}

    _change(journal, audit, actor, Permission.SETUP, "line.add", f"adding line {name}", fn)


def list_lines(journal: Journal) -> list[Line]:
    def q(c: sqlite3.Connection) -> list[Line]:
        stations: dict[str, list[str]] = {}
        for st, line in c.execute("SELECT name, line FROM stations WHERE line IS NOT NULL ORDER BY name"):
            stations.setdefault(line, []).append(st)
        rows = c.execute("SELECT name, description, created_at FROM production_line ORDER BY name").fetchall()
        return [Line(n, d, t, tuple(stations.get(n, []))) for n, d, t in rows]

    return _read(journal, q)


def assign_station(journal: Journal, audit: AuditSink, actor: User, station: str, line: str | None) -> None:
    """Put a station on a production line (None: take it off any line; it then gets no certificates)."""
    names.STATION.check(station)
    if line is not None:
        names.LINE.check(line)

    def fn(conn: sqlite3.Connection) -> Mapping[str, Any]:
        row = conn.execute("SELECT line FROM stations WHERE name=?", (station,)).fetchone()
        if row is None:
            raise ProductionError(f"no station named {station!r} (see birthline station list)")
        if (
            line is not None
            and not conn.execute("SELECT 1 FROM production_line WHERE name=?", (line,)).fetchone()
        ):
            raise ProductionError(f"no line named {line!r}")
        conn.execute("UPDATE stations SET line=? WHERE name=?", (line, station))
        return {"station": station, "line": line, "previous_line": row[0]}

    _change(
        journal,
        audit,
        actor,
        Permission.STATION_ASSIGN,
        "station.assign-line",
        f"assigning station {station}",
        fn,
    )


# -- work orders ---------------------------------------------------------------------------------------------------------
def _spec_problems(conn: sqlite3.Connection, spec: WorkOrderSpec, where: str) -> list[Problem]:
    problems = []
    if conn.execute("SELECT 1 FROM work_order WHERE id=?", (spec.id,)).fetchone():
        problems.append(Problem(f"{where}.id", f"work order {spec.id!r} already exists"))
    if not conn.execute("SELECT 1 FROM product WHERE name=?", (spec.product,)).fetchone():
        problems.append(Problem(f"{where}.product", f"no product named {spec.product!r}"))
    for line in spec.lines:
        if not conn.execute("SELECT 1 FROM production_line WHERE name=?", (line,)).fetchone():
            problems.append(Problem(f"{where}.lines", f"no line named {line!r}"))
    return problems


def _insert_work_order(conn: sqlite3.Connection, spec: WorkOrderSpec, state: str, now: float) -> None:
    conn.execute(
        "INSERT INTO work_order (id, product, quantity, consumed, pattern, valid_from, valid_to, state, created_at,"
        " activated_at) VALUES (?,?,?,0,?,?,?,?,?,?)",
        (spec.id, spec.product, spec.quantity, spec.pattern, spec.valid_from, spec.valid_to, state, now,
         now if state == "active" else None),
    )  # fmt: skip
    conn.executemany(
        "INSERT INTO work_order_line (work_order, line) VALUES (?,?)",
        [(spec.id, line) for line in spec.lines],
    )
    conn.executemany(
        "INSERT INTO work_order_serial (work_order, serial) VALUES (?,?)",
        [(spec.id, s) for s in spec.serials],
    )
    conn.executemany(
        "INSERT INTO work_order_range (work_order, prefix, first, last, width) VALUES (?,?,?,?,?)",
        [(spec.id, r.prefix, r.first, r.last, r.width) for r in spec.ranges],
    )


def _spec_audit(spec: WorkOrderSpec) -> dict[str, Any]:
    return {
        "work_order": spec.id, "product": spec.product, "quantity": spec.quantity, "lines": list(spec.lines),
        "serials": len(spec.serials), "ranges": [str(r) for r in spec.ranges], "pattern": spec.pattern,
        "valid_from": iso(spec.valid_from), "valid_to": iso(spec.valid_to),
    }  # fmt: skip


def add_work_order(
    journal: Journal, audit: AuditSink, actor: User, spec: WorkOrderSpec, *, activate: bool = False
) -> None:
    """Store a work order, however it was built (CLI, a program): its names and allowlist are checked here by
    the same rules an MES import is checked with."""
    problems = spec_problems(spec)
    if problems:
        raise ProductionError(f"work order {safe_repr(spec.id)} not added:", problems)

    def fn(conn: sqlite3.Connection) -> Mapping[str, Any]:
        problems = _spec_problems(conn, spec, "work order")
        if problems:
            raise ProductionError(f"work order {spec.id!r} not added:", problems)
        _insert_work_order(conn, spec, "active" if activate else "draft", time.time())
        return {**_spec_audit(spec), "state": "active" if activate else "draft"}

    _change(journal, audit, actor, Permission.WORK_ORDER, "workorder.add", f"adding work order {spec.id}", fn)


def import_work_orders(
    journal: Journal,
    audit: AuditSink,
    actor: User,
    text: str,
    fmt: str,
    *,
    source: str = "",
    activate: bool = False,
) -> list[str]:
    """Import an MES file all-or-nothing: every problem in every row is reported, and nothing is stored unless
    there are none. Returns the imported work-order ids."""
    actor.require(Permission.WORK_ORDER)
    located, problems = parse_import(text, fmt)
    imported: list[str] = []

    def fn(conn: sqlite3.Connection) -> Mapping[str, Any]:
        found = list(problems)
        for where, spec in located:
            found.extend(_spec_problems(conn, spec, where))
        if found:
            found.sort(key=lambda p: _where_key(p.where))
            raise ProductionError(
                f"{source or 'import'}: {len(found)} problem(s); nothing was imported:", found
            )
        now = time.time()
        for _, spec in located:
            _insert_work_order(conn, spec, "active" if activate else "draft", now)
            audit.append(conn, actor.name, "workorder.add", {**_spec_audit(spec), "imported_from": source})
            imported.append(spec.id)
        return {"source": source, "format": fmt, "work_orders": list(imported)}

    _change(journal, audit, actor, Permission.WORK_ORDER, "workorder.import", "importing work orders", fn)
    return imported


def _where_key(where: str) -> tuple[int, str]:
    digits = "".join(ch if ch.isdigit() else " " for ch in where.split(".", maxsplit=1)[0]).split()
    return (int(digits[0]) if digits else 0, where)


def _set_state(journal: Journal, audit: AuditSink, actor: User, wo_id: str, state: str) -> None:
    names.WORK_ORDER_ID.check(wo_id)
    allowed_from = {"active": ("draft",), "closed": ("draft", "active")}[state]

    def fn(conn: sqlite3.Connection) -> Mapping[str, Any]:
        row = conn.execute("SELECT state FROM work_order WHERE id=?", (wo_id,)).fetchone()
        if row is None:
            raise ProductionError(f"no work order {wo_id!r}")
        if row[0] not in allowed_from:
            raise ProductionError(f"work order {wo_id!r} is {row[0]}; it cannot become {state}")
        if (
            state == "active"
            and not conn.execute("SELECT 1 FROM work_order_line WHERE work_order=?", (wo_id,)).fetchone()
        ):
            raise ProductionError(f"work order {wo_id!r} has no line; assign one before activating it")
        column = "activated_at" if state == "active" else "closed_at"
        conn.execute(f"UPDATE work_order SET state=?, {column}=? WHERE id=?", (state, time.time(), wo_id))
        return {"work_order": wo_id, "from": row[0], "to": state}

    event = "workorder.activate" if state == "active" else "workorder.close"
    _change(journal, audit, actor, Permission.WORK_ORDER, event, f"setting work order {wo_id} {state}", fn)


def activate_work_order(journal: Journal, audit: AuditSink, actor: User, wo_id: str) -> None:
    _set_state(journal, audit, actor, wo_id, "active")


def close_work_order(journal: Journal, audit: AuditSink, actor: User, wo_id: str) -> None:
    """Closed is final: no more certificates for it (rework included)."""
    _set_state(journal, audit, actor, wo_id, "closed")


def assign_work_order_line(
    journal: Journal, audit: AuditSink, actor: User, wo_id: str, line: str, *, remove: bool = False
) -> None:
    names.WORK_ORDER_ID.check(wo_id)
    names.LINE.check(line)

    def fn(conn: sqlite3.Connection) -> Mapping[str, Any]:
        row = conn.execute("SELECT state FROM work_order WHERE id=?", (wo_id,)).fetchone()
        if row is None:
            raise ProductionError(f"no work order {wo_id!r}")
        if row[0] == "closed":
            raise ProductionError(f"work order {wo_id!r} is closed")
        if not conn.execute("SELECT 1 FROM production_line WHERE name=?", (line,)).fetchone():
            raise ProductionError(f"no line named {line!r}")
        if remove:
            conn.execute("DELETE FROM work_order_line WHERE work_order=? AND line=?", (wo_id, line))
        else:
            conn.execute(
                "INSERT OR IGNORE INTO work_order_line (work_order, line) VALUES (?,?)", (wo_id, line)
            )
        return {"work_order": wo_id, "line": line, "removed": remove}

    _change(journal, audit, actor, Permission.WORK_ORDER, "workorder.assign-line", f"lines of {wo_id}", fn)


WO_COLUMNS = "id, product, quantity, consumed, state, pattern, valid_from, valid_to, created_at, activated_at, closed_at"


def _load_work_order(conn: sqlite3.Connection, row: Sequence[Any]) -> WorkOrder:
    wo_id = row[0]
    lines = tuple(
        r[0]
        for r in conn.execute("SELECT line FROM work_order_line WHERE work_order=? ORDER BY line", (wo_id,))
    )
    count = conn.execute("SELECT COUNT(*) FROM work_order_serial WHERE work_order=?", (wo_id,)).fetchone()[0]
    ranges = tuple(
        SerialRange(*r)
        for r in conn.execute(
            "SELECT prefix, first, last, width FROM work_order_range WHERE work_order=? ORDER BY rowid",
            (wo_id,),
        )
    )
    i, product, quantity, consumed, state, pattern, vf, vt, created, activated, closed = row
    return WorkOrder(
        i, product, quantity, consumed, state, pattern, vf, vt, created, activated, closed,
        lines=lines, serial_count=int(count), ranges=ranges,
    )  # fmt: skip


def get_work_order(journal: Journal, wo_id: str) -> WorkOrder:
    def q(conn: sqlite3.Connection) -> WorkOrder:
        row = conn.execute(f"SELECT {WO_COLUMNS} FROM work_order WHERE id=?", (wo_id,)).fetchone()
        if row is None:
            raise ProductionError(f"no work order {wo_id!r}")
        return _load_work_order(conn, row)

    return _read(journal, q)


def list_work_orders(journal: Journal, state: str | None = None) -> list[WorkOrder]:
    def q(conn: sqlite3.Connection) -> list[WorkOrder]:
        rows = conn.execute(
            f"SELECT {WO_COLUMNS} FROM work_order WHERE ?1 IS NULL OR state=?1 ORDER BY created_at, id",
            (state,),
        ).fetchall()
        return [_load_work_order(conn, r) for r in rows]

    return _read(journal, q)


# -- rework and scrap ----------------------------------------------------------------------------------------------------
def _issued_row(conn: sqlite3.Connection, ca: str, device_serial: str) -> tuple[int, str, str]:
    row = conn.execute(
        "SELECT id, state, cert_serial FROM issuance WHERE ca=? AND device_serial=?"
        " AND state NOT IN ('burned', 'reworked') AND updated_by IS NULL",
        (ca, device_serial),
    ).fetchone()
    if row is None:
        ra = conn.execute(
            "SELECT state FROM ra_request WHERE ca=? AND device_serial=? AND state != 'failed'",
            (ca, device_serial),
        ).fetchone()
        if ra is not None:
            raise ProductionError(
                f"device {device_serial!r} is in RA mode: its certificate comes from the upstream CA ({ra[0]});"
                " rework, scrap and revocation of it are done at the upstream CA"
            )
        raise ProductionError(f"device {device_serial!r} has no certificate from CA {ca!r}")
    if row[1] == "scrapped":
        raise ProductionError(f"device {device_serial!r} is already scrapped")
    if row[1] not in ("issued", "confirmed"):
        raise ProductionError(f"device {device_serial!r} is being issued right now ({row[1]}); try again")
    return int(row[0]), str(row[1]), str(row[2])


def _unit_work_order(conn: sqlite3.Connection, issuance_id: int) -> str | None:
    # A key update (CMP kur) has no unit of its own: it counts under the device's first certificate's.
    return work_order_of(conn, issuance_id)


def rework(
    journal: Journal, audit: AuditSink, actor: User, device_serial: str, reason: str, *, ca: str
) -> None:
    """A supervisor authorises one new key for an issued device.

    The old issuance row becomes 'reworked' (it keeps its certificate, which is to be revoked as superseded
    when revocation exists), and a rework grant lets the work-order policy authorise exactly one new issuance
    for this serial on a line of the same work order, without taking another unit of its quantity: the device
    was already counted once.
    """
    names.DEVICE_SERIAL.check(device_serial)
    names.REASON.check(reason)

    def fn(conn: sqlite3.Connection) -> Mapping[str, Any]:
        row_id, state, cert_serial = _issued_row(conn, ca, device_serial)
        wo = _unit_work_order(conn, row_id)
        if wo is None:
            raise ProductionError(
                f"device {device_serial!r} was not issued under a work order; rework needs one"
            )
        conn.execute("UPDATE issuance SET state='reworked' WHERE id=? AND state=?", (row_id, state))
        conn.execute(
            "INSERT INTO rework (ca, device_serial, old_issuance, work_order, authorised_by, reason, created_at)"
            " VALUES (?,?,?,?,?,?,?)",
            (ca, device_serial, row_id, wo, actor.name, reason, time.time()),
        )
        return {
            "device_serial": device_serial,
            "cert_serial": cert_serial,
            "work_order": wo,
            "reason": reason,
        }

    _change(journal, audit, actor, Permission.REWORK, "device.rework", f"reworking {device_serial}", fn)


def scrap(
    journal: Journal, audit: AuditSink, actor: User, device_serial: str, reason: str, *, ca: str
) -> None:
    """A supervisor records a destroyed device: its row becomes 'scrapped' and its serial is never issued
    again. The unit stays counted against the work order. CRL/OCSP publication comes with revocation."""
    names.DEVICE_SERIAL.check(device_serial)
    names.REASON.check(reason)

    def fn(conn: sqlite3.Connection) -> Mapping[str, Any]:
        row_id, state, cert_serial = _issued_row(conn, ca, device_serial)
        wo = _unit_work_order(conn, row_id)
        conn.execute("UPDATE issuance SET state='scrapped' WHERE id=? AND state=?", (row_id, state))
        conn.execute(
            "INSERT INTO scrap (issuance_id, device_serial, cert_serial, work_order, authorised_by, reason,"
            " created_at) VALUES (?,?,?,?,?,?,?)",
            (row_id, device_serial, cert_serial, wo, actor.name, reason, time.time()),
        )
        return {
            "device_serial": device_serial,
            "cert_serial": cert_serial,
            "work_order": wo,
            "reason": reason,
        }

    _change(journal, audit, actor, Permission.SCRAP, "device.scrap", f"scrapping {device_serial}", fn)
