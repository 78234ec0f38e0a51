"""Configuration: TOML into frozen dataclasses, with every problem reported at once and where it is."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from appliance.config import load_config, parse_config
from appliance.errors import ConfigError

DOCS = Path(__file__).resolve().parents[2] / "docs"

MINIMAL = {"hsm": {"module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "t", "pin_file": "/etc/pin"}}


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    cfg = parse_config(MINIMAL, base_dir=tmp_path)
    assert cfg.journal.path == Path("/var/lib/birthline/journal.sqlite")
    assert cfg.issuance.default_profile == "idevid"
    assert set(cfg.profiles) == {
        "idevid"
    }  # the Matter built-in carries a test VID: never served unconfigured
    with pytest.raises(AttributeError):
        cfg.issuance.max_csr_bytes = 1  # type: ignore[misc]


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    data = {
        "hsm": {"module": "/x.so", "pin": "1234", "token_labl": "typo"},
        "journal": {"batch_max": 0},
        "issuance": {"max_csr_bytes": "big", "default_profile": "nope"},
        "profiles": {"p": {"base": "idevid", "key_algorithms": ["rsa-1024"]}},
        "extra": {},
    }
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    where = {p.where for p in exc.value.problems}
    assert {
        "hsm.token_label",
        "hsm.pin",
        "hsm.token_labl",
        "hsm",
        "journal.batch_max",
        "issuance.max_csr_bytes",
        "issuance.default_profile",
        "extra",
    } <= where
    assert any(w.startswith("profiles.p.key_algorithms") for w in where)
    assert "1234" not in str(exc.value)  # a PIN put in the config by mistake is not echoed


def test_station_failure_limits_are_read_and_checked() -> None:
    cfg = parse_config({**MINIMAL, "stations": {"failure_limit": 3, "failure_window_s": 30}})
    assert (cfg.stations.failure_limit, cfg.stations.failure_window_s) == (3, 30.0)
    assert (parse_config(MINIMAL).stations.failure_limit, parse_config(MINIMAL).stations.failure_window_s) == (
        10, 60.0,
    )  # fmt: skip
    with pytest.raises(ConfigError) as exc:
        parse_config({**MINIMAL, "stations": {"failure_limit": 0, "failure_window_s": "long"}})
    assert {p.where for p in exc.value.problems} == {"stations.failure_limit", "stations.failure_window_s"}


def test_pin_sources_are_exclusive() -> None:
    data = {"hsm": {**MINIMAL["hsm"], "pin_credential": "hsm-pin"}}
    with pytest.raises(ConfigError, match="exactly one of pin_file or pin_credential"):
        parse_config(data)


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    f = tmp_path / "etc" / "birthline.toml"
    f.parent.mkdir()
    f.write_text(
        '[appliance]\nstate_dir = "state"\n[hsm]\nmodule = "/m.so"\ntoken_label = "t"\npin_file = "pin"\n'
    )
    cfg = load_config(f)
    assert cfg.appliance.state_dir == f.parent / "state"
    assert cfg.hsm.pin_file == str(f.parent / "pin")
    assert cfg.journal.path == f.parent / "state" / "journal.sqlite"


def test_bad_toml_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[hsm\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[" * 1000, "nested too deep"),  # tomllib's recursive descent: a RecursionError before the fix
        ("{a=" * 1000, "nested too deep"),
        ("9" * 4400, "an integer too long to read"),  # Python's 4300-digit limit: a ValueError before the fix
    ],
)
def test_toml_past_the_readers_limits_is_a_config_error(tmp_path: Path, value: str, message: str) -> None:
    """Found by bench/fuzz.py's config target (regression inputs in tests/fuzz_corpus/config/)."""
    f = tmp_path / "c.toml"
    f.write_text(f"[journal]\nbatch_max = {value}\n")
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(f)
    assert [p.where for p in exc.value.problems] == [str(f)]


def test_integers_past_64_bits_are_refused_where_they_are() -> None:
    """TOML integers are 64-bit; tomllib reads any length, and a 4000-digit one made the range check's own
    message (which prints the value) raise ValueError."""
    wide = int("f" * 4000, 16)
    data = {**MINIMAL, "journal": {"batch_max": wide}, "profiles": {"p q": {"x": [1, {"y": 2**63}]}}}
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert [(p.where, p.message) for p in exc.value.problems] == [
        ("journal.batch_max", "an integer of 16000 bits: TOML integers are 64-bit"),
        ("profiles.'p q'.x[1].y", "an integer of 64 bits: TOML integers are 64-bit"),
    ]
    # The 64-bit edges themselves are TOML integers: only out of range here.
    for edge in (2**63 - 1, -(2**63)):
        with pytest.raises(ConfigError) as exc:
            parse_config({**MINIMAL, "journal": {"batch_max": edge}})
        assert [(p.where, p.message) for p in exc.value.problems] == [
            ("journal.batch_max", f"must be between 1 and 4096, got {edge}")
        ]


@pytest.mark.parametrize(
    ("section", "where", "message"),
    [
        ({"control": {"group": "wheel\x00"}}, "control.group", "no group named 'wheel\\x00'"),
        ({"upstream": {"secret_file": "a\x00b"}}, "upstream.secret_file", "not a file name: '/etc/a\\x00b'"),
        ({"upstream": {"url": "http://[::1/cmp"}}, "upstream.url", "expected http(s)://host[:port]/path"),
        ({"va": {"listen": "127.0.0.1:\u00b2"}}, "va.listen", "expected host:port or empty"),
        (
            {"stations": {"lan_listen": "h:" + "7" * 4400}},
            "stations.lan_listen",
            "expected host:port or empty",
        ),
        ({"metrics": {"listen": "h:\u0661"}}, "metrics.listen", "expected host:port or empty"),
    ],
)
def test_values_python_refuses_are_problems_where_they_are(
    section: dict[str, object], where: str, message: str
) -> None:
    """Found by bench/fuzz.py's config target: each raised ValueError out of the loader (a NUL in a path or a group
    name, a bracketed URL host that is not IPv6, a port of Unicode digits or of thousands of digits)."""
    with pytest.raises(ConfigError) as exc:
        parse_config({**MINIMAL, **section}, base_dir=Path("/etc"))
    assert any(p.where == where and p.message.startswith(message) for p in exc.value.problems), (
        exc.value.problems
    )


def test_unknown_keys_show_where_they_are_even_when_empty_or_unprintable() -> None:
    """atheris found a top-level `"" = nan` reported as an unknown section at '' (nowhere)."""
    data = {**MINIMAL, "": 1, "a\x1b[2J": {}, "journal": {"": 1, "line\nbreak": 2}}
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert {(p.where, p.message) for p in exc.value.problems} == {
        ("''", "unknown section"),
        ("'a\\x1b[2J'", "unknown section"),
        ("journal.''", "unknown key"),
        ("journal.'line\\x0abreak'", "unknown key"),
    }


def test_documented_example_parses() -> None:
    text = (DOCS / "configuration.md").read_text()
    block = re.search(r"## A complete example\n\n```toml\n(.*?)```", text, re.S)
    assert block is not None
    cfg = parse_config(tomllib.loads(block.group(1)))
    assert cfg.issuance.default_profile == "acme-idevid"
    assert cfg.profiles["acme-matter"].vendor_id == "FFF1"
    assert cfg.hsm.pin_credential == "hsm-pin"


def test_every_key_the_parser_knows_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    for key in [
        "state_dir", "module", "token_label", "pin_file", "pin_credential", "softhsm_conf", "call_timeout_s",
        "path", "batch_max", "issuing_ca", "default_profile", "max_csr_bytes", "clock_skew_s", "prepare_workers",
        "quota_warning_percent",
        "pipeline_depth", "listen", "crl_validity_s", "ocsp_validity_s", "signer_validity_days", "signer_renew_days",
        "never_issued", "poll_s", "max_request_bytes", "http_max_age_s",
        "lan_listen", "tls_dir", "management_ca", "handshake_timeout_s", "idle_timeout_s", "frame_timeout_s",
        "reopen_interval_s", "registry_poll_s", "failure_limit", "failure_window_s",
        "max_message_bytes", "confirm_wait_s", "max_pending", "default_label", "ra_cert", "station", "profile",
        "secret_file", "kid", "station_signature", "trusted_ca", "allow_rr", "allow_nested", "implicit_confirm",
        "accept_ra_verified", "url", "mode", "batch_wait_s", "protection", "server_cert", "recipient",
        "accept_sha1_mac", "connect_timeout_s", "request_timeout_s", "backoff_base_s", "backoff_cap_s",
        "max_queue_age_s", "max_queue_size", "hard_max_queue_age_s", "hard_max_queue_size",
        "max_connections", "max_connections_per_peer", "auth_timeout_s", "header_timeout_s", "body_timeout_s",
    ]:  # fmt: skip
        assert f"| `{key}` |" in text, key


def test_upstream_section_is_checked(tmp_path: Path) -> None:
    base = {"hsm": {"module": "m", "token_label": "t", "pin_file": "p"}}
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "upstream": {"url": "ftp://x", "mode": "burst", "protection": "mac",
                                           "secret": "inline", "max_queue_size": 10, "hard_max_queue_size": 5}})  # fmt: skip
    where = {p.where for p in info.value.problems}
    assert {"upstream.url", "upstream.mode", "upstream.secret", "upstream.secret_file", "upstream.kid",
            "upstream.hard_max_queue_size"} <= where, where  # fmt: skip
    cert = tmp_path / "up.pem"
    cert.write_text("x")
    cfg = parse_config({**base, "upstream": {"url": "https://ca.example:8443/.well-known/cmp/p/ra", "mode": "batched",
                                             "server_cert": str(cert)}})  # fmt: skip
    assert cfg.upstream.enabled and cfg.upstream.mode == "batched" and cfg.upstream.batch_max == 50


def test_listener_bounds_have_defaults_and_every_problem_is_reported() -> None:
    cfg = parse_config(MINIMAL)
    assert (cfg.stations.max_connections, cfg.stations.max_connections_per_peer) == (128, 16)
    assert cfg.va.limits.max_connections == 256 and cfg.cmp.limits.body_timeout_s == 30
    data = {
        **MINIMAL,
        "stations": {"max_connections": 4, "max_connections_per_peer": 8, "auth_timeout_s": 0},
        "va": {"max_connections": 0, "header_timeout_s": "soon", "idle_timeout_s": 1e9},
        "cmp": {"max_connections": 10, "max_connections_per_peer": 11, "body_timeout_s": -1},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    where = {p.where for p in info.value.problems}
    assert where >= {
        "stations.max_connections_per_peer", "stations.auth_timeout_s", "va.max_connections",
        "va.header_timeout_s", "va.idle_timeout_s", "cmp.max_connections_per_peer", "cmp.body_timeout_s",
    }, where  # fmt: skip
    ok = parse_config({**MINIMAL, "va": {"max_connections": 10, "max_connections_per_peer": 10,
                                          "header_timeout_s": 2.5, "body_timeout_s": 3, "idle_timeout_s": 4}})  # fmt: skip
    assert ok.va.limits.caps.max_per_peer == 10 and ok.va.limits.header_timeout_s == 2.5


@pytest.mark.parametrize(
    ("stations", "va"),
    [
        ("127.0.0.1:17450", "127.0.0.1:17450"),
        ("0.0.0.0:17450", "127.0.0.1:17450"),
        ("[::]:17450", "10.0.0.5:17450"),
    ],
)
def test_two_listeners_on_one_port_are_refused_naming_both(stations: str, va: str) -> None:
    """Review finding 8: they passed `config check`, and `run` blamed another program for the port."""
    data = {**MINIMAL, "stations": {"lan_listen": stations}, "va": {"listen": va}}
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert [str(p) for p in exc.value.problems] == [
        str(p) for p in exc.value.problems if p.where == "va.listen"
    ]
    assert "port 17450 is stations.lan_listen's too: give each listener its own port" in str(exc.value)
    parse_config({**MINIMAL, "stations": {"lan_listen": stations}, "va": {"listen": "127.0.0.1:17451"}})
    parse_config(
        {**MINIMAL, "stations": {"lan_listen": "127.0.0.1:17450"}, "va": {"listen": "127.0.0.2:17450"}}
    )


def test_listeners_on_port_zero_each_get_their_own() -> None:
    parse_config({**MINIMAL, "stations": {"lan_listen": "127.0.0.1:0"}, "va": {"listen": "127.0.0.1:0"}})


def test_a_configuration_path_that_never_ends_is_refused_not_read_forever(tmp_path: Path) -> None:
    """/dev/zero given as the configuration (a typo, a hostile CLI argument): a ConfigError saying why, after
    reading at most MAX_CONFIG_BYTES + 1, not a hang until memory runs out; a regular file one byte too big too."""
    from appliance.config import MAX_CONFIG_BYTES, load_config

    with pytest.raises(ConfigError) as info:
        load_config(Path("/dev/zero"))
    assert f"larger than {MAX_CONFIG_BYTES} bytes" in str(info.value)
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(big)
    big.write_bytes(
        b"#" * MAX_CONFIG_BYTES
    )  # at the limit: read and judged as TOML (a comment: defaults missing)
    with pytest.raises(ConfigError) as info:
        load_config(big)
    assert "larger than" not in str(info.value)


def test_the_ocsp_cache_is_bounded_and_holds_what_is_made_ahead() -> None:
    """[va] cache_max bounds the OCSP answers kept in memory (about 2 KB each; 10,000 by default), and answers
    made ahead of time must fit in it."""
    assert parse_config(MINIMAL).va.settings.cache_max == 10_000
    cfg = parse_config({**MINIMAL, "va": {"cache_max": 500, "presign_max": 500}})
    assert (cfg.va.settings.cache_max, cfg.va.settings.presign_max) == (500, 500)
    with pytest.raises(ConfigError) as exc:
        parse_config({**MINIMAL, "va": {"cache_max": 500, "presign_max": 501}})
    assert [p.where for p in exc.value.problems] == ["va.presign_max"]
    assert "cache_max (500)" in str(exc.value)
    with pytest.raises(ConfigError, match=r"va\.cache_max"):
        parse_config({**MINIMAL, "va": {"cache_max": 99}})
