"""The [cmp] and [upstream] keys of issue 11: label trust (idevid_roots, issuing_ca, signer revocation and CRLs),
the CRL fetch bounds, and an upstream configuration a conformant upstream would refuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import parse_config
from appliance.errors import ConfigError

MINIMAL = {"hsm": {"module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "t", "pin_file": "/etc/pin"}}


def test_batched_upstream_with_mac_protection_is_refused(tmp_path: Path) -> None:
    """RFC 9483 5.2.2: nested messages are signature-protected; `config check` says so rather than let the
    forwarder send batches every conformant upstream refuses."""
    secret = tmp_path / "s"
    secret.write_text("x")
    secret.chmod(0o600)
    upstream = {"url": "http://127.0.0.1:9/x", "protection": "mac", "kid": "k", "secret_file": str(secret)}
    parse_config({**MINIMAL, "upstream": upstream})  # single mode: fine
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, "upstream": {**upstream, "mode": "batched"}})
    assert [p.where for p in err.value.problems] == ["upstream.protection"]
    assert "5.2.2" in err.value.problems[0].message


def test_label_trust_keys(tmp_path: Path) -> None:
    label = {"station": "field-1", "idevid_roots": "vendors.pem", "issuing_ca": "operational",
             "signer_revocation": "none", "crl_files": ["a.crl", "b.crl"], "crl_fetch": False}  # fmt: skip
    cfg = parse_config(
        {**MINIMAL, "cmp": {"crl_timeout_s": 2, "labels": {"field": label}}}, base_dir=tmp_path
    )
    got = cfg.cmp.labels["field"]
    assert (got.idevid_roots, got.issuing_ca, got.signer_revocation, got.crl_files, got.crl_fetch) == (
        tmp_path / "vendors.pem", "operational", "none", (tmp_path / "a.crl", tmp_path / "b.crl"), False)  # fmt: skip
    assert cfg.cmp.crl_timeout_s == 2 and cfg.cmp.crl_max_bytes == 1024 * 1024
    bad = {**label, "signer_revocation": "maybe", "crl_files": "a.crl", "issuing_ca": "no such/ca"}
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, "cmp": {"crl_timeout_s": 0, "labels": {"field": bad}}}, base_dir=tmp_path)
    assert {p.where for p in err.value.problems} == {
        "cmp.crl_timeout_s", "cmp.labels.field.signer_revocation", "cmp.labels.field.crl_files",
        "cmp.labels.field.issuing_ca",
    }  # fmt: skip


def test_the_keys_are_documented() -> None:
    text = (Path(__file__).resolve().parents[3] / "docs" / "configuration.md").read_text()
    for key in ("issuing_ca", "idevid_roots", "signer_revocation", "crl_files", "crl_fetch", "crl_timeout_s",
                "crl_max_bytes", "crl_retry_s", "crl_refresh_s"):  # fmt: skip
        assert f"| `{key}` |" in text, key


def test_config_check_warns_that_mac_upstream_protection_refuses_crmf_and_kur_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review finding 10: with [upstream] protection = "mac", the records of devices enrolled over CMP with a
    CRMF request (sent upstream as cr with POP raVerified) and of key updates need an RA's signature: the
    upstream refuses them (notAuthorized), and in RA mode such a device's ir ends in a rejection after polling.
    `config check` accepts the file (it is valid) and says so, with what to do; not without a CMP server, or
    with signature protection."""
    from appliance.cli.main import main

    secret = tmp_path / "s"
    secret.write_text("x")
    secret.chmod(0o600)
    hsm = '[hsm]\nmodule = "/usr/lib/softhsm/libsofthsm2.so"\ntoken_label = "t"\npin_file = "/etc/pin"\n'
    upstream = (
        f'[upstream]\nurl = "http://127.0.0.1:9/x"\nprotection = "mac"\nkid = "k"\nsecret_file = "{secret}"\n'
    )
    cmp = f'[cmp]\nlisten = "127.0.0.1:7452"\n[cmp.labels.demo]\nstation = "st"\nsecret_file = "{secret}"\n'
    cases = {"mac with cmp": (hsm + upstream + cmp, True), "mac without cmp": (hsm + upstream, False),
             "signature with cmp": (hsm + upstream.replace('"mac"', '"signature"') + 'server_cert = "up.pem"\n'
                                    + cmp, False)}  # fmt: skip
    for case, (text, warned) in cases.items():
        path = tmp_path / "c.toml"
        path.write_text(text)
        assert main(["config", "check", "--config", str(path)]) == 0, case
        out = capsys.readouterr().out
        assert ("warning: upstream.protection" in out) is warned, (case, out)
        if warned:
            assert "raVerified" in out and "notAuthorized" in out and "protection = 'signature'" in out, out
