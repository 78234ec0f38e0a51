"""parse_profiles: TOML tables to Profiles, with every problem reported at once and a dotted path."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ConfigError
from appliance.profiles import NOT_AFTER_FOREVER, Profile, builtin_profiles, parse_profiles

DOC_EXAMPLE = Path(__file__).resolve().parents[3] / "docs" / "profiles.md"


def parse_one(table: dict[str, Any], name: str = "p") -> tuple[Profile | None, list[str]]:
    profiles, problems = parse_profiles({name: table})
    return profiles.get(name), [str(p) for p in problems]


def test_empty_table_gives_idevid_defaults() -> None:
    profile, problems = parse_one({})
    assert problems == []
    assert profile == Profile(name="p")
    assert profile is not None
    assert profile.not_after == NOT_AFTER_FOREVER and profile.validity_days is None
    assert profile.key_usage == ("digital_signature",) and profile.key_usage_critical
    assert profile.basic_constraints and profile.backdate_seconds == 0 and profile.device_serial_max == 64


def test_full_idevid() -> None:
    profile, problems = parse_one(
        {
            "kind": "idevid",
            "subject_o": "Example Devices GmbH",
            "subject_ou": "Line 3",
            "subject_cn": "Sensor X",
            "key_algorithms": ["ec-p256", "ec-p384"],
            "validity_days": 3650,
            "backdate_seconds": 300,
            "key_usage": ["key_agreement", "digital_signature"],
            "key_usage_critical": False,
            "basic_constraints": False,
            "hardware_module_name": "1.3.6.1.4.1.99999.1",
            "masa_url": "https://masa.example.com/.well-known/brski",
            "crl_urls": ["http://crl.example.com/idevid.crl"],
            "ocsp_url": "http://ocsp.example.com",
            "device_serial_max": 32,
        }
    )
    assert problems == [], problems
    assert profile is not None
    assert profile.key_usage == ("digital_signature", "key_agreement")
    assert profile.not_after is None and profile.validity_days == 3650
    assert profile.key_algorithms == frozenset({"ec-p256", "ec-p384"})
    assert profile.crl_urls == ("http://crl.example.com/idevid.crl",)


def test_many_problems_reported_at_once_with_paths() -> None:
    _, problems = parse_one(
        {
            "key_algoritms": ["ec-p256"],
            "key_algorithms": ["ec-p256", "ec-p384", "rsa-1024", 7],
            "not_after": "99991231235959Z",
            "validity_days": 10,
            "hardware_module_name": "1.3.6.1.banana",
            "crl_urls": ["ldap://crl.example.com/x", "http://ok.example.com/x.crl", "https://exa mple.com"],
            "ocsp_url": "ocsp.example.com",
            "masa_url": "https://mäsa.example.com",
            "basic_constraints": "yes",
            "backdate_seconds": True,
            "device_serial_max": 65,
            "vendor_id": "FFF1",
            "subject_o": "Evil\u202eCorp",
        },
        name="idevid",
    )
    text = "\n".join(problems)
    expected = [
        "profiles.idevid.key_algoritms: unknown key (did you mean 'key_algorithms'?)",
        "profiles.idevid.key_algorithms[2]: unknown algorithm 'rsa-1024'; allowed: ec-p256, ec-p384,",
        "profiles.idevid.key_algorithms[3]: must be a string, not integer",
        "profiles.idevid: set either not_after or validity_days, not both",
        "profiles.idevid.hardware_module_name: not a valid OID",
        "profiles.idevid.crl_urls[0]: must be an http:// or https:// URL",
        "profiles.idevid.crl_urls[2]: URL must be printable ASCII without spaces",
        "profiles.idevid.ocsp_url: not an absolute URI",
        "profiles.idevid.masa_url: URL must be printable ASCII",
        "profiles.idevid.basic_constraints: must be true or false, not string",
        "profiles.idevid.backdate_seconds: must be an integer, not boolean",
        "profiles.idevid.device_serial_max: must be between 1 and 64, not 65",
        "profiles.idevid.vendor_id: only valid for kind = 'matter-dac'",
        "profiles.idevid.subject_o: contains control or bidi characters: 'Evil\\u202eCorp'",
    ]
    for line in expected:
        assert line in text, f"missing {line!r} in:\n{text}"
    assert len(problems) == len(expected), text
    assert "\u202e" not in text


def test_config_error_carries_all_problems() -> None:
    _, problems = parse_profiles({"a": {"kind": "x509"}, "b": {"key_algorithms": []}, "c d": {}, "e": 3})
    err = ConfigError(problems, "birthline.toml")
    text = str(err)
    assert "profiles.a.kind: unknown kind 'x509'" in text
    assert "profiles.b.key_algorithms: must list at least one algorithm" in text
    assert "profiles.'c d': profile name 'c d' is not allowed: 1..64 characters" in text
    assert "profiles.e: must be a table, not integer" in text
    assert len(err.problems) == 4


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"key_algorithms": "ec-p256"}, "key_algorithms: must be an array of strings, not string"),
        ({"key_usage": ["key_cert_sign"]}, "unknown or disallowed key usage 'key_cert_sign'"),
        ({"key_usage": ["digital_signature", "digital_signature"]}, "listed twice"),
        ({"key_usage": ["encipher_only"]}, "encipher_only/decipher_only need key_agreement"),
        (
            {"key_usage": ["key_agreement"], "key_algorithms": ["ed25519"]},
            "key_agreement cannot be used with ed25519",
        ),
        ({"not_after": "20491231235959Z "}, "not_after: must be a GeneralizedTime"),
        ({"not_after": "99991331235959Z"}, "not_after: not a valid date"),
        ({"not_after": 99991231235959}, "not_after: must be a string, not integer"),
        ({"validity_days": 0}, "validity_days: must be between 1"),
        ({"validity_days": 1.5}, "validity_days: must be an integer, not float"),
        ({"backdate_seconds": -1}, "backdate_seconds: must be between 0"),
        ({"subject_cn": ""}, "subject_cn: must be non-empty"),
        ({"subject_cn": "x" * 65}, "at most 64 allowed"),
        ({"subject_ou": "a\x00b"}, "control or bidi"),
        ({"hardware_module_name": "3.1.2"}, "bad OID root"),
        ({"hardware_module_name": "1.2.03"}, "bad OID arc"),
        ({"ocsp_url": "https://"}, "must be an http:// or https:// URL with a host"),
        ({"ocsp_url": "http://host:99999/"}, "not a valid URL"),
        ({"masa_url": "masa.example.com"}, "not an absolute URI"),
        ({"crl_urls": ["http://a/"] * 9}, "at most 8 URLs"),
        ({"base": "nope"}, "unknown built-in profile 'nope'"),
        ({"base": 1}, "base: must be a string"),
        ({"kind": "matter-dac"}, "vendor_id: required for a Matter DAC"),
        ({"kind": "matter-dac", "vendor_id": "fff1", "product_id": "8000"}, "4 uppercase hex digits"),
        ({"kind": "matter-dac", "vendor_id": "FFF12", "product_id": "8000"}, "4 uppercase hex digits"),
        (
            {"base": "matter-dac", "key_algorithms": ["ec-p256", "ec-p384"]},
            "requires key_algorithms = ['ec-p256']",
        ),
        ({"base": "matter-dac", "key_usage": ["digital_signature", "key_agreement"]}, "requires key_usage"),
        ({"base": "matter-dac", "key_usage_critical": False}, "requires key_usage_critical = True"),
        ({"base": "matter-dac", "basic_constraints": False}, "requires basic_constraints = True"),
        ({"base": "matter-dac", "hardware_module_name": "1.2.3"}, "requires hardware_module_name = None"),
        ({"base": "matter-dac", "masa_url": "https://m"}, "requires masa_url = None"),
        ({"base": "matter-dac", "subject_cn": "x"}, "requires subject_cn = None"),
        ({"base": "matter-dac", "kind": "idevid"}, "vendor_id: only valid for kind = 'matter-dac'"),
    ],
)
def test_single_problem(table: dict[str, Any], message: str) -> None:
    profile, problems = parse_one(table)
    assert profile is None
    assert any(message in p for p in problems), problems


def test_base_overrides() -> None:
    profile, problems = parse_one({"base": "idevid", "validity_days": 30, "subject_o": "ACME"})
    assert problems == []
    assert profile is not None
    assert profile.name == "p" and profile.validity_days == 30 and profile.not_after is None
    assert profile.key_algorithms == builtin_profiles()["idevid"].key_algorithms

    matter, problems = parse_one({"base": "matter-dac", "vendor_id": "1234", "product_id": "ABCD"})
    assert problems == []
    assert matter is not None
    assert (matter.kind, matter.vendor_id, matter.product_id) == ("matter-dac", "1234", "ABCD")


def test_kind_matter_without_base_is_p256_only() -> None:
    profile, problems = parse_one({"kind": "matter-dac", "vendor_id": "1234", "product_id": "5678"})
    assert problems == []
    assert profile is not None and profile.key_algorithms == frozenset({"ec-p256"})


def test_builtins_not_included_by_parse() -> None:
    profiles, problems = parse_profiles({})
    assert profiles == {} and problems == []
    builtins = builtin_profiles()
    assert set(builtins) == {"idevid", "matter-dac"}
    assert builtins["idevid"].key_algorithms == frozenset({"ec-p256", "ec-p384", "rsa-2048", "rsa-3072"})
    assert builtins["idevid"].hardware_module_name is None
    assert builtins["matter-dac"].vendor_id == "FFF1" and builtins["matter-dac"].product_id == "8000"


def test_profile_is_frozen() -> None:
    profile = builtin_profiles()["idevid"]
    with pytest.raises(AttributeError):
        profile.name = "x"  # type: ignore[misc]


def test_not_a_mapping() -> None:
    profiles, problems = parse_profiles([], where="x.profiles")  # type: ignore[arg-type]
    assert profiles == {}
    assert str(problems[0]) == "x.profiles: must be a table of profiles, not array"


def test_docs_example_parses() -> None:
    """The TOML example in docs/profiles.md must stay valid."""
    text = DOC_EXAMPLE.read_text()
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    data = tomllib.loads(block)
    profiles, problems = parse_profiles(data["profiles"])
    assert problems == []
    assert set(profiles) == {"sensor-idevid", "matter-dac-prod"}
    assert profiles["sensor-idevid"].hardware_module_name is not None
    assert profiles["sensor-idevid"].masa_url is not None
    assert profiles["matter-dac-prod"].kind == "matter-dac"
