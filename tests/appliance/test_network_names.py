"""Issue 17 items 1 and 2: the appliance's network names and a management CA under the organisation's own root.

A LAN fixture enrols by the appliance's DNS name and by its LAN address, in a private network namespace
(`unshare -n -m`: an address on its own loopback, a hosts file mapping the name), with the fixture client
checking the hostname; a name the certificate does not carry fails the check. The management CA that signs the
TLS certificates there was requested from (`ca request --role management`) and signed by an external root.
Changing the names is an administrator's act: the daemon serves the old certificate under an alarm until
`birthline tls reissue` (audited)."""

from __future__ import annotations

import datetime as dt
import io
import json
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import ca as ca_mod
from appliance import stations_registry as reg
from appliance.audit.log import AuditLog
from appliance.cli.main import main
from appliance.config import load_config
from appliance.daemon import Daemon
from appliance.issuance.journal import Journal
from hsm.softhsm import SoftHsmToken
from hsm.token import Token
from tests.appliance.cmp.upstream_support import child_env, netns_ok
from tests.appliance.conftest import PRODUCTION_PASSWORD

NAME, ADDRESS, PORT = "birthline.line1.test", "10.77.0.1", 7450

# Runs inside the namespace: the daemon on every address, a LAN station, and the fixture client's attempts.
CHILD = """
import asyncio, json, ssl, sys
from pathlib import Path
from appliance import stations_registry as reg
from appliance.cli.stations import lan_host
from appliance.config import load_config
from appliance.daemon import Daemon
from stations.client import client_ssl_context, enroll_device
from tests.appliance.conftest import put_on_line

config, bundle = load_config(Path(sys.argv[1])), Path(sys.argv[2])

async def main():
    out = {}
    async with Daemon(config) as d:
        creds = reg.add_station(d.journal, d.core.token, "lan-1", "lan",
                                management_ca=config.stations.management_ca, audit=d.core.audit, actor="alice")
        put_on_line(d.journal, "lan-1")
        reg.write_bundle(creds, bundle, lan_host=lan_host(config))
        await d.refresh()
        out["bundle_host"] = json.loads((bundle / "station.json").read_text())["host"]
        out["served"] = list(reg.served_names(d.tls_files))
        out["alarms"] = [a.cause for a in d.core.alarms.active()]
        by_name = await asyncio.to_thread(enroll_device, bundle, "SN-0101")  # the bundle's host: the DNS name
        by_address = await asyncio.to_thread(enroll_device, bundle, "SN-0102", host=f"{sys.argv[3]}:{sys.argv[4]}")
        out["enrolled"] = [len(by_name.chain), len(by_address.chain)]
        ctx = client_ssl_context(bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt")
        try:
            _, w = await asyncio.open_connection("elsewhere.test", int(sys.argv[4]), ssl=ctx)
            w.close()
            out["elsewhere"] = "connected"
        except ssl.SSLCertVerificationError as exc:
            out["elsewhere"] = exc.verify_message
    print(json.dumps(out))

if __name__ == "__main__":  # the issuance workers re-import this file (spawn)
    asyncio.run(main())
"""


def _external_management_ca(journal: Journal, token: Token, name: str) -> x509.Certificate:
    """`ca request --role management`, signed by an organisation's root outside the appliance, then `ca import`."""
    audit = AuditLog(journal)
    _, csr_pem = ca_mod.create_csr_for_external_root(
        journal, token, name, "O=Acme Devices,CN=Acme Appliance Management CA", role="management", audit=audit,
        actor="alice",
    )  # fmt: skip
    csr = x509.load_pem_x509_csr(csr_pem)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Acme Corporate Root")])
    now = dt.datetime.now(dt.UTC)

    def ca_cert(subject: x509.Name, public_key: object, path_len: int) -> x509.Certificate:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        return (
            x509.CertificateBuilder().subject_name(subject).issuer_name(root_name)
            .public_key(public_key).serial_number(x509.random_serial_number())  # type: ignore[arg-type]
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)  # type: ignore[arg-type]
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256())
        )  # fmt: skip

    root = ca_cert(root_name, root_key.public_key(), 1)
    signed = ca_cert(csr.subject, csr.public_key(), 0)
    pem = serialization.Encoding.PEM
    rec = ca_mod.import_ca_certificate(journal, token, name, signed.public_bytes(pem), root.public_bytes(pem),
                                       audit=audit, actor="alice")  # fmt: skip
    assert rec.role == "management" and rec.state == "active" and rec.parent is None
    return root


def _config(
    path: Path, state: Path, softhsm_token: SoftHsmToken, *, names: list[str], lan: str, mgmt: str
) -> Path:
    cfg = softhsm_token.hsm_config()
    path.write_text(
        f'[appliance]\nstate_dir = "{state}"\nnames = {json.dumps(names)}\n'
        f'[hsm]\nmodule = "{cfg.module}"\ntoken_label = "{cfg.token_label}"\npin_file = "{cfg.pin_file}"\n'
        f'softhsm_conf = "{cfg.softhsm_conf}"\n'
        f'[stations]\nlan_listen = "{lan}"\ntls_dir = "{state / "tls"}"\nmanagement_ca = "{mgmt}"\n'
        '[va]\nlisten = ""\n[control]\nenabled = false\n'
    )
    return path


@pytest.mark.skipif(not netns_ok(), reason="unshare -n (a private network namespace) is not available here")
def test_a_fixture_enrols_by_the_appliances_lan_name_and_address(
    softhsm_token: SoftHsmToken, hsm_token: Token, production_journal_template: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copy(production_journal_template, state / "journal.sqlite")
    mgmt = f"mgmt-{secrets.token_hex(3)}"
    with Journal(state / "journal.sqlite") as journal:
        root = _external_management_ca(journal, hsm_token, mgmt)
    config = _config(tmp_path / "c.toml", state, softhsm_token, names=[NAME, ADDRESS], lan=f"0.0.0.0:{PORT}",
                     mgmt=mgmt)  # fmt: skip
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{ADDRESS} {NAME}\n{ADDRESS} elsewhere.test\n")
    (tmp_path / "child.py").write_text(CHILD)
    script = (
        f"ip link set lo up && ip addr add {ADDRESS}/32 dev lo && mount --bind {hosts} /etc/hosts && "
        f"{sys.executable} {tmp_path / 'child.py'} {config} {tmp_path / 'bundle'} {ADDRESS} {PORT}"
    )
    done = subprocess.run(["unshare", "-n", "-m", "sh", "-c", script], env=child_env(), capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["bundle_host"] == f"{NAME}:{PORT}"
    assert out["served"] == [
        NAME,
        "localhost",
        ADDRESS,
        "127.0.0.1",
        "::1",
    ]  # DNS names first, then addresses
    assert "tls.names" not in out["alarms"]
    assert out["enrolled"] == [3, 3]  # device, issuing CA, root
    assert "hostname mismatch" in out["elsewhere"].lower(), out["elsewhere"]
    # The server certificate chains to the management CA, which chains to the organisation's root.
    server = x509.load_pem_x509_certificate((state / "tls" / "server.crt").read_bytes())
    management = x509.load_pem_x509_certificate((state / "tls" / "management-ca.crt").read_bytes())
    server.verify_directly_issued_by(management)
    management.verify_directly_issued_by(root)


def test_names_are_configuration_checked_and_each_kept_once(tmp_path: Path) -> None:
    from appliance.config import parse_config
    from appliance.errors import ConfigError

    base = {"hsm": {"module": "/x.so", "token_label": "t", "pin_file": "/p"}}
    good = parse_config({**base, "appliance": {"names": ["Birthline.Line1.test", "10.0.0.5", "fd00::5"]}})
    assert good.appliance.names == ("Birthline.Line1.test", "10.0.0.5", "fd00::5")
    assert reg.server_names(good.appliance.names, ("0.0.0.0", 7450)) == (  # noqa: S104 - a wildcard, left out
        "birthline.line1.test", "10.0.0.5", "fd00::5", "localhost", "127.0.0.1", "::1")  # fmt: skip
    assert reg.server_names((), ("10.0.0.9", 7450)) == (
        "birthline",
        "10.0.0.9",
        "localhost",
        "127.0.0.1",
        "::1",
    )
    with pytest.raises(ConfigError) as bad:
        parse_config({**base, "appliance": {"names": ["*.acme.example", "a..b", "10.0.0", "-x.test", "ok.test",
                                                      "OK.test", 5]}})  # fmt: skip
    text = str(bad.value)
    for i in (0, 1, 2, 3, 6):
        assert f"appliance.names[{i}]" in text, text
    assert "appliance.names[5]: 'OK.test' is listed twice" in text and "appliance.names[4]" not in text


async def test_changed_names_are_served_only_after_an_audited_reissue(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copy(production_journal_template, state / "journal.sqlite")
    first = _config(
        tmp_path / "a.toml", state, softhsm_token, names=[NAME], lan="127.0.0.1:0", mgmt="management"
    )
    async with Daemon(load_config(first)) as d:
        assert d.core is not None and d.tls_files is not None and NAME in reg.served_names(d.tls_files)
        assert "tls.names" not in {a.cause for a in d.core.alarms.active()}
    moved = _config(tmp_path / "b.toml", state, softhsm_token, names=[NAME, "line1-b.test"], lan="127.0.0.1:0",
                    mgmt="management")  # fmt: skip
    async with Daemon(load_config(moved)) as d:
        assert d.core is not None and d.tls_files is not None
        alarm = next(a for a in d.core.alarms.active() if a.cause == "tls.names")
        assert "line1-b.test" not in reg.served_names(d.tls_files) and "birthline tls reissue" in alarm.advice

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PRODUCTION_PASSWORD}\n"))
    capsys.readouterr()
    assert (
        await _in_thread(
            main, ["tls", "reissue", "--user", "alice", "--password-stdin", "--config", str(moved)]
        )
        == 0
    )
    assert "reissued for birthline.line1.test, line1-b.test, 127.0.0.1" in capsys.readouterr().out
    async with Daemon(load_config(moved)) as d:
        assert d.core is not None and d.tls_files is not None
        assert "line1-b.test" in reg.served_names(d.tls_files)
        assert "tls.names" not in {a.cause for a in d.core.alarms.active()}
    with Journal(state / "journal.sqlite") as journal:
        rows = journal.call(lambda: journal.conn.execute(
            "SELECT actor, event, data FROM audit WHERE event LIKE 'tls.%' ORDER BY seq").fetchall())  # fmt: skip
    assert [(a, e) for a, e, _ in rows] == [("appliance", "tls.issued"), ("alice", "tls.reissued")]
    assert json.loads(rows[1][2])["names"] == [NAME, "line1-b.test", "127.0.0.1", "localhost", "::1"]


async def _in_thread(fn: object, *args: object) -> object:
    import asyncio

    return await asyncio.to_thread(fn, *args)  # type: ignore[arg-type]


def test_ca_list_shows_the_external_root_an_imported_ca_chains_to(
    softhsm_token: SoftHsmToken, hsm_token: Token, production_journal_template: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Item 9: a CA made under the organisation's offline root was listed alone at the top, as if it were a root;
    the anchor a relying party needs was nowhere. `ca list` shows it above the CA, marked external."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copy(production_journal_template, state / "journal.sqlite")
    mgmt = f"mgmt-{secrets.token_hex(3)}"
    with Journal(state / "journal.sqlite") as journal:
        root = _external_management_ca(journal, hsm_token, mgmt)
    config = _config(tmp_path / "c.toml", state, softhsm_token, names=[NAME], lan="127.0.0.1:0", mgmt=mgmt)
    capsys.readouterr()
    assert main(["ca", "list", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("CN=Acme Corporate Root"))
    assert (
        lines[at].endswith("(external root: not in the HSM)")
        and f"serial={root.serial_number:x}" in lines[at]
    )
    assert lines[at + 1].startswith(
        f"  {mgmt} [management, active] O=Acme Devices,CN=Acme Appliance Management"
    )
    assert main(["ca", "list", "--json", "--config", str(config)]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed[mgmt]["chain"] == ["CN=Acme Corporate Root"]
