"""Profiles from configuration: validate every key of every table and report all problems at once."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

from appliance import names
from appliance.der import oid_content
from appliance.errors import Problem
from appliance.profiles.model import (
    DEVICE_SERIAL_MAX,
    KEY_ALGORITHMS,
    KEY_USAGES,
    KINDS,
    NOT_AFTER_FOREVER,
    Profile,
)
from appliance.profiles.serial import is_clean_text, safe_repr

_HEX4_RE: Final = re.compile(r"[0-9A-F]{4}")
_GENERALIZED_TIME_RE: Final = re.compile(r"\d{14}Z")
_URI_SCHEME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")

# RFC 5280 Appendix A upper bounds for the attributes a profile may set.
_UB_SUBJECT: Final = 64
_MAX_URL: Final = 2048
_MAX_CRL_URLS: Final = 8
_MAX_BACKDATE: Final = 7 * 24 * 3600
_MAX_VALIDITY_DAYS: Final = 100 * 366

_MATTER_VID_TEST: Final = "FFF1"
_MATTER_PID_TEST: Final = "8000"

# Matter 1.x 6.2.2: the DAC profile is fixed; these keys cannot be changed for kind = "matter-dac".
_MATTER_FIXED: Final[dict[str, Any]] = {
    "key_algorithms": frozenset({"ec-p256"}),
    "key_usage": ("digital_signature",),
    "key_usage_critical": True,
    "basic_constraints": True,
    "hardware_module_name": None,
    "masa_url": None,
    "subject_cn": None,
}


def builtin_profiles() -> dict[str, Profile]:
    """The two profiles that need no configuration.

    Not merged into `parse_profiles` results on purpose: "matter-dac" carries the test vendor ID FFF1, which
    must never be served by a production line just because nobody configured a profile.
    """
    return {
        "idevid": Profile(name="idevid"),
        "matter-dac": Profile(
            name="matter-dac",
            kind="matter-dac",
            key_algorithms=frozenset({"ec-p256"}),
            vendor_id=_MATTER_VID_TEST,
            product_id=_MATTER_PID_TEST,
        ),
    }


def _key_path(where: str, key: str) -> str:
    return f"{where}.{key}" if names.PROFILE.problem(key) is None else f"{where}.{safe_repr(key)}"


def _type_name(value: object) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "array",
        dict: "table",
    }.get(type(value), type(value).__name__)


class _Checker:
    """Collects problems for one profile table; each check returns the converted value or None."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.problems: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def path(self, key: str) -> str:
        return f"{self.where}.{key}"

    def string(self, key: str, value: Any) -> str | None:
        if not isinstance(value, str):
            self.add(self.path(key), f"must be a string, not {_type_name(value)}")
            return None
        return value

    def boolean(self, key: str, value: Any) -> bool | None:
        if not isinstance(value, bool):
            self.add(self.path(key), f"must be true or false, not {_type_name(value)}")
            return None
        return value

    def integer(self, key: str, value: Any, low: int, high: int) -> int | None:
        # TOML booleans are Python ints; `true` must not pass as 1.
        if type(value) is not int:
            self.add(self.path(key), f"must be an integer, not {_type_name(value)}")
            return None
        if not low <= value <= high:
            self.add(self.path(key), f"must be between {low} and {high}, not {value}")
            return None
        return value

    def string_list(self, key: str, value: Any) -> list[tuple[str, str]] | None:
        """(path, item) pairs of a list of strings; non-string items are reported and dropped."""
        if not isinstance(value, list):
            self.add(self.path(key), f"must be an array of strings, not {_type_name(value)}")
            return None
        items: list[tuple[str, str]] = []
        for i, item in enumerate(value):
            p = f"{self.path(key)}[{i}]"
            if isinstance(item, str):
                items.append((p, item))
            else:
                self.add(p, f"must be a string, not {_type_name(item)}")
        return items

    def subject_text(self, key: str, value: Any) -> str | None:
        text = self.string(key, value)
        if text is None:
            return None
        if not text or text != text.strip():
            self.add(self.path(key), "must be non-empty, without leading or trailing whitespace")
        elif len(text) > _UB_SUBJECT:
            self.add(self.path(key), f"is {len(text)} characters; at most {_UB_SUBJECT} allowed (RFC 5280)")
        elif not is_clean_text(text):
            self.add(self.path(key), f"contains control or bidi characters: {safe_repr(text)}")
        else:
            return text
        return None

    def url(self, path: str, value: str, *, http_only: bool) -> str | None:
        if len(value) > _MAX_URL:
            self.add(path, f"URL longer than {_MAX_URL} characters")
            return None
        # IA5String on the wire (RFC 5280 4.2.1.6); IRIs must be mapped to URIs by the administrator.
        if not value.isascii() or any(not 0x21 <= ord(ch) <= 0x7E for ch in value):
            self.add(path, f"URL must be printable ASCII without spaces (IA5String): {safe_repr(value)}")
            return None
        scheme, sep, rest = value.partition(":")
        if not sep or not _URI_SCHEME_RE.fullmatch(scheme) or not rest:
            self.add(path, f"not an absolute URI: {safe_repr(value)}")
            return None
        if http_only:
            try:
                parts = urlsplit(value)
                parts.port  # noqa: B018  (raises ValueError on a bad port)
            except ValueError:
                self.add(path, f"not a valid URL: {safe_repr(value)}")
                return None
            if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
                self.add(path, f"must be an http:// or https:// URL with a host: {safe_repr(value)}")
                return None
        return value


def _parse_not_after(checker: _Checker, value: Any) -> str | None:
    text = checker.string("not_after", value)
    if text is None:
        return None
    if not _GENERALIZED_TIME_RE.fullmatch(text):
        checker.add(
            checker.path("not_after"),
            f"must be a GeneralizedTime like {NOT_AFTER_FOREVER!r}: {safe_repr(text)}",
        )
        return None
    try:
        datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        checker.add(checker.path("not_after"), f"not a valid date and time: {safe_repr(text)}")
        return None
    return text


@functools.lru_cache(maxsize=64)
def not_after_datetime(text: str) -> datetime:
    """The datetime of a validated `not_after` string."""
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)


def _parse_key_algorithms(checker: _Checker, value: Any) -> frozenset[str] | None:
    items = checker.string_list("key_algorithms", value)
    if items is None:
        return None
    ok = True
    for p, item in items:
        if item not in KEY_ALGORITHMS:
            checker.add(p, f"unknown algorithm {safe_repr(item)}; allowed: {', '.join(KEY_ALGORITHMS)}")
            ok = False
    if not value:
        checker.add(checker.path("key_algorithms"), "must list at least one algorithm")
        return None
    if len(items) != len(value) or not ok:
        return None
    return frozenset(item for _, item in items)


def _parse_key_usage(checker: _Checker, value: Any) -> tuple[str, ...] | None:
    items = checker.string_list("key_usage", value)
    if items is None:
        return None
    names: list[str] = []
    ok = len(items) == len(value)
    for p, item in items:
        if item not in KEY_USAGES:
            checker.add(
                p, f"unknown or disallowed key usage {safe_repr(item)}; allowed: {', '.join(KEY_USAGES)}"
            )
            ok = False
        elif item in names:
            checker.add(p, f"key usage {item!r} listed twice")
            ok = False
        else:
            names.append(item)
    if ("encipher_only" in names or "decipher_only" in names) and "key_agreement" not in names:
        # RFC 5280 4.2.1.3: both bits are undefined without keyAgreement.
        checker.add(checker.path("key_usage"), "encipher_only/decipher_only need key_agreement")
        ok = False
    return tuple(sorted(names, key=KEY_USAGES.index)) if ok else None


def _parse_oid(checker: _Checker, key: str, value: Any) -> str | None:
    text = checker.string(key, value)
    if text is None:
        return None
    try:
        oid_content(text)
    except ValueError as exc:
        checker.add(checker.path(key), f"not a valid OID ({exc})")
        return None
    return text


def _parse_hex4(checker: _Checker, key: str, value: Any) -> str | None:
    text = checker.string(key, value)
    if text is None:
        return None
    if not _HEX4_RE.fullmatch(text):
        checker.add(checker.path(key), f"must be 4 uppercase hex digits like 'FFF1', not {safe_repr(text)}")
        return None
    return text


def _parse_crl_urls(checker: _Checker, value: Any) -> tuple[str, ...] | None:
    items = checker.string_list("crl_urls", value)
    if items is None:
        return None
    if len(items) > _MAX_CRL_URLS:
        checker.add(checker.path("crl_urls"), f"at most {_MAX_CRL_URLS} URLs")
        return None
    urls = [checker.url(p, item, http_only=True) for p, item in items]
    if len(items) != len(value) or any(u is None for u in urls):
        return None
    return tuple(u for u in urls if u is not None)


# key -> parser(checker, value) returning the field value, or None after reporting a problem.
_Parser = Callable[[_Checker, Any], Any]
_PARSERS: Final[dict[str, _Parser]] = {
    "kind": lambda c, v: c.string("kind", v),
    "subject_o": lambda c, v: c.subject_text("subject_o", v),
    "subject_ou": lambda c, v: c.subject_text("subject_ou", v),
    "subject_cn": lambda c, v: c.subject_text("subject_cn", v),
    "key_algorithms": _parse_key_algorithms,
    "not_after": _parse_not_after,
    "validity_days": lambda c, v: c.integer("validity_days", v, 1, _MAX_VALIDITY_DAYS),
    "backdate_seconds": lambda c, v: c.integer("backdate_seconds", v, 0, _MAX_BACKDATE),
    "key_usage": _parse_key_usage,
    "key_usage_critical": lambda c, v: c.boolean("key_usage_critical", v),
    "basic_constraints": lambda c, v: c.boolean("basic_constraints", v),
    "hardware_module_name": lambda c, v: _parse_oid(c, "hardware_module_name", v),
    "masa_url": lambda c, v: (
        None if (s := c.string("masa_url", v)) is None else c.url(c.path("masa_url"), s, http_only=False)
    ),
    "crl_urls": _parse_crl_urls,
    "ocsp_url": lambda c, v: (
        None if (s := c.string("ocsp_url", v)) is None else c.url(c.path("ocsp_url"), s, http_only=True)
    ),
    "device_serial_max": lambda c, v: c.integer("device_serial_max", v, 1, DEVICE_SERIAL_MAX),
    "vendor_id": lambda c, v: _parse_hex4(c, "vendor_id", v),
    "product_id": lambda c, v: _parse_hex4(c, "product_id", v),
}
_KNOWN_KEYS: Final = ("base", *_PARSERS)


def _parse_one(name: str, table: Mapping[str, Any], where: str) -> tuple[Profile | None, list[Problem]]:
    checker = _Checker(where)
    builtins = builtin_profiles()

    start = Profile(name=name)
    if "base" in table:
        base = checker.string("base", table["base"])
        if base is not None:
            if base in builtins:
                start = dataclasses.replace(builtins[base], name=name)
            else:
                checker.add(
                    checker.path("base"),
                    f"unknown built-in profile {safe_repr(base)}; choose one of: {', '.join(builtins)}",
                )

    values: dict[str, Any] = {}
    failed: set[str] = set()
    for key, raw in table.items():
        if key == "base":
            continue
        parser = _PARSERS.get(key)
        if parser is None:
            hint = difflib.get_close_matches(key, _KNOWN_KEYS, n=1)
            suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
            checker.add(_key_path(where, key), f"unknown key{suffix}")
            continue
        value = parser(checker, raw)
        if value is None:
            failed.add(key)
        else:
            values[key] = value

    if "kind" in values and values["kind"] not in KINDS:
        checker.add(
            checker.path("kind"), f"unknown kind {safe_repr(values['kind'])}; allowed: {', '.join(KINDS)}"
        )
        failed.add("kind")
        del values["kind"]

    if "not_after" in table and "validity_days" in table:
        checker.add(where, "set either not_after or validity_days, not both")
    elif "validity_days" in values:
        # A table's own choice replaces the inherited one, so `base` plus validity_days works.
        values["not_after"] = None
    elif "not_after" in values:
        values["validity_days"] = None

    if values.get("kind", start.kind) == "matter-dac" and "key_algorithms" not in table:
        # An idevid base would otherwise carry RSA and P-384 into a Matter profile.
        values["key_algorithms"] = frozenset({"ec-p256"})

    # Cross-field checks run on whatever did parse, so one pass reports as much as possible.
    merged = dataclasses.replace(start, **values)
    _check_kind_rules(checker, merged, table, failed)

    if checker.problems:
        return None, checker.problems
    return merged, []


def _check_kind_rules(
    checker: _Checker, profile: Profile, table: Mapping[str, Any], failed: set[str]
) -> None:
    if profile.kind == "matter-dac":
        for key, fixed in _MATTER_FIXED.items():
            if key in table and key not in failed and getattr(profile, key) != fixed:
                shown = sorted(fixed) if isinstance(fixed, frozenset) else fixed
                checker.add(checker.path(key), f"a Matter DAC requires {key} = {shown!r} (Matter 6.2.2)")
        for key in ("vendor_id", "product_id"):
            if getattr(profile, key) is None and key not in failed:
                checker.add(checker.path(key), "required for a Matter DAC")
    else:
        for key in ("vendor_id", "product_id"):
            # Also catches base = "matter-dac" with kind = "idevid", where the inherited IDs would be ignored.
            if getattr(profile, key) is not None:
                checker.add(checker.path(key), "only valid for kind = 'matter-dac'")
        if (
            "key_usage" not in failed
            and "key_agreement" in profile.key_usage
            and "ed25519" in profile.key_algorithms
        ):
            checker.add(checker.path("key_usage"), "key_agreement cannot be used with ed25519 keys")


def parse_profiles(
    tables: Mapping[str, Any], where: str = "profiles"
) -> tuple[dict[str, Profile], list[Problem]]:
    """Profiles from the `[profiles.<name>]` tables of a parsed TOML file.

    Returns only the profiles without problems, and every problem found in any of them. Built-in profiles are
    not added: see `builtin_profiles`. A table may set `base = "<built-in name>"` to start from a built-in.
    """
    profiles: dict[str, Profile] = {}
    problems: list[Problem] = []
    if not isinstance(tables, Mapping):
        return {}, [Problem(where, f"must be a table of profiles, not {_type_name(tables)}")]
    for name, table in tables.items():
        path = _key_path(where, name)
        problem = names.PROFILE.problem(name)
        if problem is not None:
            problems.append(Problem(path, problem))
            continue
        if not isinstance(table, Mapping):
            problems.append(Problem(path, f"must be a table, not {_type_name(table)}"))
            continue
        profile, found = _parse_one(name, table, path)
        problems.extend(found)
        if profile is not None:
            profiles[name] = profile
    return profiles, problems
