"""The hand-built TBS (appliance/issuance/template.py) against cryptography's builder, byte for byte.

Every builtin profile and a spread of configured ones, under CA keys of each algorithm, with the edge cases of
every field the template fills in: serial numbers at the top and bottom of their range and with the high bit of
a byte set, device serials of 1 and 64 characters with every PrintableString punctuation mark, validity across
the UTCTime / GeneralizedTime boundary, and device keys of every accepted algorithm. And the run-time net: a
template that would differ is retired and cryptography's TBS used, with an alarm in the service.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import random
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from appliance.alarms import Alarms
from appliance.ca import CaRecord
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.prepare import Job, PrepareContext, Prepared, Preparer
from appliance.issuance.service import IssueService
from appliance.issuance.tbs import Tbs, TbsMaker
from appliance.issuance.template import ALARM, CHECK_EVERY, TbsTemplate, spki_of
from appliance.profiles import Profile, build_certificate, builtin_profiles
from hsm.algorithms import from_public_key
from hsm.token import Token
from tests.appliance.conftest import make_csr

UTC = dt.UTC


def _ca(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, *, ski: bool = True,
        units: int = 0) -> x509.Certificate:  # fmt: skip
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Birthline Test"),
        *(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"{i}" * 60) for i in range(units)),
        x509.NameAttribute(NameOID.COMMON_NAME, "Template Test Issuing CA"),
    ])  # fmt: skip
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(7).not_valid_before(dt.datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(dt.datetime(2060, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )  # fmt: skip
    if ski:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


@pytest.fixture(scope="module")
def cas() -> dict[str, x509.Certificate]:
    return {
        "p256": _ca(ec.generate_private_key(ec.SECP256R1())),
        "p384": _ca(ec.generate_private_key(ec.SECP384R1())),
        "rsa2048": _ca(rsa.generate_private_key(65537, 2048)),
        "ed25519": _ca(ed25519.Ed25519PrivateKey.generate()),
        "p256-no-ski-long-name": _ca(ec.generate_private_key(ec.SECP256R1()), ski=False, units=3),
    }


@pytest.fixture(scope="module")
def device_keys() -> list[object]:
    return [
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        ec.generate_private_key(ec.SECP384R1()).public_key(),
        rsa.generate_private_key(65537, 2048).public_key(),
        ed25519.Ed25519PrivateKey.generate().public_key(),
    ]


def _profiles() -> list[Profile]:
    builtin = builtin_profiles()
    return [
        builtin["idevid"],
        builtin["matter-dac"],
        Profile(
            name="full", subject_o="Acme Devices GmbH", subject_ou="Line 7", subject_cn="Acme Sensor",
            hardware_module_name="1.3.6.1.4.1.99999.1.2", masa_url="https://masa.example.com/.well-known/brski",
            crl_urls=("http://crl.example.com/issuing.crl", "ldap://ldap.example.com/cn=issuing"),
            ocsp_url="http://ocsp.example.com", key_usage=("digital_signature", "key_agreement"),
            key_usage_critical=False, validity_days=3650, backdate_seconds=3600,
        ),
        Profile(name="bare", basic_constraints=False, key_usage=(), not_after="20491231235959Z"),
        Profile(name="utf8", subject_o="Usine Électronique Ünïcödé ✓", subject_ou="U" * 60, subject_cn="Ω" * 32, validity_days=1),
        Profile(name="fixed-2050", not_after="20500101000000Z", hardware_module_name="1.3.6.1.4.1.1.1"),
        Profile(name="short-serials", device_serial_max=8, validity_days=10000),
    ]  # fmt: skip


_SERIALS = [1 << 64, (1 << 127) - 1, 0x80 << 64, 0xFF80 << 100, (1 << 64) + 0x80, 0x7F << 120]
_DEVICES = ["A", "SN-0001", "Z" * 64, "a b'()+,-./:=?0", "1" * 8]
_TIMES = [
    dt.datetime(2026, 12, 6, 0, 5, 9, tzinfo=UTC),
    dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC),
    dt.datetime(2040, 2, 29, 12, 0, 0, tzinfo=UTC),
    dt.datetime(2030, 1, 1, 0, 0, 0, 999999, tzinfo=UTC),
]


def _cases(profile: Profile, keys: list[object]) -> Iterator[tuple[str, object, int, dt.datetime]]:
    limit = profile.device_serial_max
    for device, key, serial, now in itertools.product(_DEVICES, keys, _SERIALS, _TIMES):
        if len(device) > limit:
            continue
        if profile.not_after is not None and now.year >= 2049 and profile.not_after.startswith("2049"):
            continue  # issued after the profile's fixed notAfter: refused by validity(), not a TBS case
        yield device, key, serial, now


@pytest.mark.parametrize("ca_name", ["p256", "p384", "rsa2048", "ed25519", "p256-no-ski-long-name"])
def test_the_hand_built_tbs_is_cryptographys_byte_for_byte(
    ca_name: str, cas: dict[str, x509.Certificate], device_keys: list[object]
) -> None:
    ca = cas[ca_name]
    maker = TbsMaker(ca.public_key(), from_public_key(ca.public_key()))
    compared = 0
    for profile in _profiles():
        template = TbsTemplate(profile, ca, maker, _TIMES[0])
        for device, key, serial, now in _cases(profile, device_keys):
            builder = build_certificate(
                profile, issuer_cert=ca, device_serial=device, public_key=key,  # type: ignore[arg-type]
                serial_number=serial, now=now,
            )  # fmt: skip
            expected = maker.make(builder)
            made = template.make(device_serial=device, spki_der=spki_of(key), serial_number=serial, now=now)
            assert made == expected, (profile.name, device, serial, now)
            compared += 1
    assert compared > 1000


def test_random_inputs_match_too(cas: dict[str, x509.Certificate], device_keys: list[object]) -> None:
    rng = random.Random(15)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?"
    ca = cas["p256"]
    maker = TbsMaker(ca.public_key(), from_public_key(ca.public_key()))
    profiles = _profiles()
    templates = {p.name: TbsTemplate(p, ca, maker, _TIMES[0]) for p in profiles}
    for _ in range(2000):
        profile = rng.choice(profiles)
        length = rng.randint(1, min(64, profile.device_serial_max))
        device = "".join(rng.choice(alphabet) for _ in range(length)).strip(" ") or "X"
        serial = rng.randrange(1 << 64, 1 << 127)
        now = dt.datetime(2026, 1, 1, tzinfo=UTC) + dt.timedelta(seconds=rng.randrange(0, 20 * 365 * 86400))
        key = rng.choice(device_keys)
        expected = maker.make(build_certificate(
            profile, issuer_cert=ca, device_serial=device, public_key=key,  # type: ignore[arg-type]
            serial_number=serial, now=now,
        ))  # fmt: skip
        made = templates[profile.name].make(
            device_serial=device, spki_der=spki_of(key), serial_number=serial, now=now
        )
        assert made == expected, (profile.name, device, serial, now)


def _preparer(ca_key: ec.EllipticCurvePrivateKey) -> tuple[Preparer, bytes]:
    ca = _ca(ca_key)
    ctx = PrepareContext(builtin_profiles(), ca.public_bytes(serialization.Encoding.DER),
                         from_public_key(ca.public_key()), 8192)  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return Preparer(ctx), csr.public_bytes(serialization.Encoding.DER)


def test_the_preparer_checks_its_templates_and_retires_one_that_differs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    preparer, csr = _preparer(ec.generate_private_key(ec.SECP256R1()))
    now = int(_TIMES[0].timestamp())
    first = preparer.prepare(Job("SN-1", csr, "idevid", now))
    assert isinstance(first, Prepared) and first.template_fault is None
    template = preparer._templates["idevid"]
    assert template is not None  # the template is in use: its first TBS equalled cryptography's

    # A template that goes wrong (simulated: its output altered by one byte) is caught by the next check.
    real = TbsTemplate.make

    def wrong(self: TbsTemplate, **kw: object) -> Tbs:
        good = real(self, **kw)  # type: ignore[arg-type]
        return dataclasses.replace(good, tbs=good.tbs[:-1] + bytes([good.tbs[-1] ^ 1]))

    monkeypatch.setattr(TbsTemplate, "make", wrong)
    faults = []
    for i in range(CHECK_EVERY):
        result = preparer.prepare(Job(f"SN-{i + 2}", csr, "idevid", now))
        assert isinstance(result, Prepared)
        if result.template_fault is not None:
            faults.append(result)
    # Exactly one certificate was checked in this window, found different, and replaced by cryptography's;
    # from then on cryptography builds every TBS of the profile.
    assert len(faults) == 1 and "differs from cryptography's" in str(faults[0].template_fault)
    assert preparer._templates["idevid"] is None
    later = preparer.prepare(Job("SN-LAST", csr, "idevid", now))
    assert isinstance(later, Prepared) and later.template_fault is None
    tbs_cert = x509.load_der_x509_certificate(later.tbs.certificate(b"\x30\x06\x02\x01\x01\x02\x01\x01"))
    assert tbs_cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-LAST"


async def test_the_service_alarms_on_a_retired_template_and_still_issues_cryptographys(
    journal: Journal, issuing: CaRecord, hsm_token: Token, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = TbsTemplate.make

    def wrong(self: TbsTemplate, **kw: object) -> Tbs:
        good = real(self, **kw)  # type: ignore[arg-type]
        return dataclasses.replace(good, tbs=good.tbs[:-1] + bytes([good.tbs[-1] ^ 1]))

    monkeypatch.setattr(TbsTemplate, "make", wrong)
    alarms = Alarms()
    key = hsm_token.get_key(issuing.key_label)
    async with IssueService(journal, issuing, key, builtin_profiles(), alarms=alarms) as svc:  # type: ignore[arg-type]
        result = await svc.issue(IssueRequest("SN-T1", make_csr()[1]))
    alarm = alarms.get(ALARM)
    assert alarm is not None and alarm.severity == "warning" and "idevid" in alarm.message
    cert = x509.load_der_x509_certificate(result.certificate)
    issuing.certificate.public_key().verify(  # type: ignore[union-attr, call-arg]
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256())
    )
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-T1"
