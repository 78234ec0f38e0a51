"""Reading one TOML table of the configuration: Reader collects every problem with where it is instead of stopping
at the first, and the helpers here read and check the value kinds several sections share (listen addresses, HTTP
bounds, lists of paths, files that hold secrets). appliance/config.py and config_frontends.py use them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from appliance import names
from appliance.connections import HttpLimits
from appliance.errors import Problem
from appliance.text import safe_repr


def is_port(text: str) -> bool:
    """ASCII digits, 0..65535. str.isdigit() alone takes '\u00b2' (which int() refuses) and strings of thousands of
    digits (which int() refuses past 4300)."""
    return text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535


class Reader:
    """Reads one TOML table, collecting problems instead of stopping at the first."""

    def __init__(self, table: Mapping[str, Any], where: str, problems: list[Problem]) -> None:
        self.table = table
        self.where = where
        self.problems = problems
        self.seen: set[str] = set()

    def _get(self, key: str, kind: type | tuple[type, ...], default: Any, required: bool) -> Any:
        self.seen.add(key)
        if key not in self.table:
            if required:
                self.problems.append(Problem(f"{self.where}.{key}", "is required"))
            return default
        value = self.table[key]
        # bool is an int in Python; a TOML `true` is never a valid count.
        if isinstance(value, bool) and kind is int:
            self.problems.append(Problem(f"{self.where}.{key}", f"expected an integer, got {value!r}"))
            return default
        if not isinstance(value, kind):
            name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.problems.append(
                Problem(f"{self.where}.{key}", f"expected {name}, got {type(value).__name__}")
            )
            return default
        return value

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> Any:
        value = self._get(key, str, default, required)
        if isinstance(value, str) and not value and required:
            self.problems.append(Problem(f"{self.where}.{key}", "must not be empty"))
        return value

    def integer(self, key: str, default: int, *, lo: int, hi: int) -> int:
        value = self._get(key, int, default, False)
        if isinstance(value, int) and not lo <= value <= hi:
            self.problems.append(
                Problem(f"{self.where}.{key}", f"must be between {lo} and {hi}, got {value}")
            )
            return default
        return int(value)

    def number(self, key: str, default: float, *, lo: float, hi: float) -> float:
        value = self._get(key, (int, float), default, False)
        if isinstance(value, bool):
            self.problems.append(Problem(f"{self.where}.{key}", f"expected a number, got {value!r}"))
            return default
        if isinstance(value, int | float) and not lo <= value <= hi:
            self.problems.append(
                Problem(f"{self.where}.{key}", f"must be between {lo:g} and {hi:g}, got {value}")
            )
            return default
        return float(value)

    def name(self, key: str, rule: names.Rule) -> None:
        """Check a name-valued key against its kind's rule (appliance.names); the value is read as text after."""
        value = self.table.get(key)
        if isinstance(value, str) and value and (problem := rule.problem(value)) is not None:
            self.problems.append(Problem(f"{self.where}.{key}", problem))

    def flag(self, key: str, default: bool) -> bool:
        return bool(self._get(key, bool, default, False))

    def done(self) -> None:
        for key in sorted(set(self.table) - self.seen):
            self.problems.append(Problem(f"{self.where}.{shown_key(key)}", "unknown key"))


def read_table(data: Mapping[str, Any], key: str, problems: list[Problem]) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        problems.append(Problem(key, f"expected a table, got {type(value).__name__}"))
        return {}
    return value


_WILDCARDS = ("", "0.0.0.0", "::")  # noqa: S104 - compared against, never bound


def shared_listener_problems(addresses: dict[str, tuple[str, int] | None]) -> list[Problem]:
    """Two listeners on one port of one address (or one of them on the wildcard) cannot both bind: the second
    would fail at `birthline run`, as if another program held the port."""
    problems: list[Problem] = []
    seen: list[tuple[str, tuple[str, int]]] = []
    for key, address in addresses.items():
        if address is None or address[1] == 0:  # port 0: each gets a free port of its own
            continue
        for other, taken in seen:
            if address[1] == taken[1] and (
                address[0] == taken[0] or _WILDCARDS.count(address[0]) + _WILDCARDS.count(taken[0])
            ):
                problems.append(
                    Problem(key, f"port {address[1]} is {other}'s too: give each listener its own port")
                )
                break
        seen.append((key, address))
    return problems


def read_host_names(r: Reader, key: str) -> tuple[str, ...]:
    """A list of network names (appliance.names.HOST), each once (DNS names compared without case)."""
    value = r._get(key, list, [], False)
    found: list[str] = []
    for i, item in enumerate(value if isinstance(value, list) else []):
        problem = names.HOST.problem(item)
        if problem is not None:
            r.problems.append(Problem(f"{r.where}.{key}[{i}]", problem))
        elif any(item.lower() == seen.lower() for seen in found):
            r.problems.append(Problem(f"{r.where}.{key}[{i}]", f"{item!r} is listed twice"))
        else:
            found.append(item)
    return tuple(found)


def read_listen(r: Reader, key: str, default: str) -> str:
    value = r.text(key, default)
    if isinstance(value, str) and value:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not is_port(port):
            r.problems.append(Problem(f"{r.where}.{key}", f"expected host:port or empty, got {value!r}"))
            return ""
    return value if isinstance(value, str) else ""


def read_http_limits(r: Reader, d: HttpLimits) -> HttpLimits:
    """The connection bounds of an HTTP listener's section ([va], [cmp])."""
    limits = HttpLimits(
        max_connections=r.integer("max_connections", d.max_connections, lo=1, hi=1_000_000),
        max_connections_per_peer=r.integer(
            "max_connections_per_peer", d.max_connections_per_peer, lo=1, hi=1_000_000
        ),
        header_timeout_s=r.number("header_timeout_s", d.header_timeout_s, lo=0.05, hi=600),
        body_timeout_s=r.number("body_timeout_s", d.body_timeout_s, lo=0.05, hi=3600),
        idle_timeout_s=r.number("idle_timeout_s", d.idle_timeout_s, lo=0.05, hi=3600),
    )
    check_per_peer(limits.max_connections, limits.max_connections_per_peer, r.where, r.problems)
    return limits


def check_per_peer(total: int, per_peer: int, where: str, problems: list[Problem]) -> None:
    if per_peer > total:
        problems.append(
            Problem(f"{where}.max_connections_per_peer", f"must not exceed max_connections ({total})")
        )


# sockaddr_un.sun_path is 108 bytes with its NUL; longer paths are bound through the directory (control/unix.py),
# but a name alone longer than this cannot be bound at all.


def check_private_file(value: Path | None, where: str, problems: list[Problem]) -> None:
    """A secret file must exist and be readable by its owner only (0600 or stricter)."""
    if value is None:
        return
    try:
        mode = value.stat().st_mode
    except OSError as exc:
        problems.append(Problem(where, f"cannot read {value}: {exc.strerror}"))
        return
    except ValueError:  # a NUL in the path, which no file name holds
        problems.append(Problem(where, f"not a file name: {safe_repr(str(value))}"))
        return
    if mode & 0o077:
        problems.append(
            Problem(where, f"{value} is readable by others (mode {mode & 0o777:o}); chmod 600 it")
        )


def read_admission_keys(r: Reader) -> dict[str, Any]:
    """The keys of what unauthenticated peers may cost, the same in [cmp] and [scep] (appliance/admission.py)."""
    return {
        "check_rate_per_client": r.number("check_rate_per_client", 5.0, lo=0.001, hi=100_000),
        "check_burst_per_client": r.integer("check_burst_per_client", 32, lo=1, hi=100_000),
        "check_rate_total": r.number("check_rate_total", 20.0, lo=0.001, hi=100_000),
        "check_burst_total": r.integer("check_burst_total", 64, lo=1, hi=100_000),
        "pace_max_delay_s": r.number("pace_max_delay_s", 1.0, lo=0, hi=30),
        "checks_in_flight": r.integer("checks_in_flight", 2, lo=1, hi=64),
        "clients_max": r.integer("clients_max", 4096, lo=16, hi=1_000_000),
        "known_client_s": r.number("known_client_s", 600.0, lo=0, hi=86400),
    }


def read_paths(r: Reader, key: str, path: Callable[[str | None], Path | None]) -> tuple[Path, ...]:
    """A list of file names (relative to the config file's directory)."""
    r.seen.add(key)
    value = r.table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        r.problems.append(Problem(f"{r.where}.{key}", "expected a list of file names"))
        return ()
    return tuple(p for v in value if (p := path(v)) is not None)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def shown_key(key: str) -> str:
    """A key from the file as a problem's location: a TOML bare key as it is, any other quoted and escaped, so an
    empty key still shows where it is and control characters reach no terminal."""
    return key if _BARE_KEY.fullmatch(key) else safe_repr(key)
