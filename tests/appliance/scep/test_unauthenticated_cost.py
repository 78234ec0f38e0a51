"""What a peer without a challenge password can make the SCEP server do (docs/scep.md "Unauthenticated peers"),
counted where the work is: RSA decryptions with the RA key in the HSM, signatures verified.

- a flood of PKCSReq with a wrong challenge from one address: the HSM decrypts at most the peer's burst plus its
  rate over the flood's length (one per request that got as far as its checks, answered 200); the rest were
  answered 503 with Retry-After and cost no decryption; a device with its challenge then enrols, and its unit is
  given back;
- a signer key outside the key policy (RSA 1024, RSA with exponent 3) is refused badAlg before its signature is
  verified and before anything is decrypted;
- a unit is given back when the request authenticates (a challenge claimed, a renewal's signer, a CertPoll's
  key), and only then;
- [scep]'s cost keys are read and checked as [cmp]'s.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from appliance.config import ScepLabelSection, ScepSection, parse_config
from appliance.errors import ConfigError
from appliance.scep import client, cms
from appliance.scep.algorithms import AlgorithmPolicy
from appliance.scep.errors import FailInfo, ScepError
from appliance.scep.oids import MessageType, PkiStatus
from hsm.softhsm import SoftHsmToken
from tests.appliance.scep.support import Served, served
from tests.appliance.scep.test_scep_flood_daemon import FLOOD_S, _csr, _flood, _pkcs_req
from tests.appliance.scep.test_server import Device, enrol, make_csr, post, scep  # noqa: F401 - scep: the fixture
from tests.appliance.test_config import MINIMAL


def _count_decrypts(monkeypatch: pytest.MonkeyPatch, key: Any) -> list[int]:
    calls = [0]
    real = key.adecrypt

    async def counting(*args: Any, **kw: Any) -> bytes:
        calls[0] += 1
        return await real(*args, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(key, "adecrypt", counting)
    return calls


async def test_a_flood_of_wrong_challenges_costs_at_most_the_budget_in_hsm_decryptions(
    softhsm_token: SoftHsmToken,
    production_journal_template: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with served(softhsm_token, production_journal_template, tmp_path) as s:
        assert s.daemon.scep is not None
        decrypts = _count_decrypts(monkeypatch, s.daemon.scep.ra.key)
        bodies = [_pkcs_req(s.ra_cert, f"SN-F{i:03d}", "not the challenge").body for i in range(4)]
        counts, elapsed = await _flood(s.port, ["127.0.0.2"], 6, bodies)
        # Defaults: 5 a second per client that does not authenticate, bursts of 32.
        assert counts["200"] <= 32 + 5 * elapsed + 2, (counts, elapsed)
        assert counts["503"] > 0 and set(counts) <= {"200", "503"}, counts
        assert decrypts[0] == counts["200"], (decrypts, counts)
        stats = s.daemon.scep.admission.stats
        assert stats["busy_client"] == counts["503"] and stats["authenticated"] == 0, stats
        assert elapsed >= FLOOD_S

        # A device with its challenge, from another address: enrols, and its unit is given back.
        secret = s.challenge(device_serial="SN-0001")
        req = _pkcs_req(s.ra_cert, "SN-0001", secret)
        status, body, _ = await post(s, req.body)
        assert status == 200, body
        reply = client.read_reply(body, ra=s.ra_cert, signer=req.signer, key=req.key, transaction_id=req.tid,
                                  sender_nonce=req.nonce)  # fmt: skip
        assert reply.status is PkiStatus.SUCCESS, reply
        assert s.daemon.scep.admission.stats["authenticated"] == 1


@pytest.mark.parametrize(("bits", "exponent"), [(1024, 65537), (2048, 3)])
async def test_a_signer_key_outside_the_policy_is_refused_before_it_is_used(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    bits: int, exponent: int,
) -> None:  # fmt: skip
    async with served(softhsm_token, production_journal_template, tmp_path) as s:
        assert s.daemon.scep is not None
        decrypts = _count_decrypts(monkeypatch, s.daemon.scep.ra.key)
        key = rsa.generate_private_key(public_exponent=exponent, key_size=bits)
        signer = client.self_signed(key, "device")
        secret = s.challenge(device_serial="SN-0002")
        tid, nonce = os.urandom(8).hex(), os.urandom(16)
        data = client.request(MessageType.PKCS_REQ, _csr(key, "SN-0002", secret), signer=signer, key=key,
                              ra=s.ra_cert, transaction_id=tid, sender_nonce=nonce)  # fmt: skip
        status, body, _ = await post(s, data)
        assert status == 200, body
        answer = cms.read_signed(body, client._ANY)
        assert answer.pki_status == PkiStatus.FAILURE and answer.fail_info == FailInfo.BAD_ALG, answer
        assert "not accepted" in (answer.fail_info_text or "")
        assert decrypts[0] == 0


@pytest.mark.parametrize(("bits", "exponent"), [(1024, 65537), (2048, 3), (4096, 3)])
def test_the_signer_key_is_judged_before_the_signature_is_verified(bits: int, exponent: int) -> None:
    """Signed by another key than the certificate's: a verification would fail (badMessageCheck); the key is
    refused first (badAlg), so no verification with it was made."""
    ra_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ra = client.self_signed(ra_key, "RA")
    key = rsa.generate_private_key(public_exponent=exponent, key_size=bits)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    data = client.request(MessageType.PKCS_REQ, b"csr", signer=client.self_signed(key), key=other, ra=ra,
                          transaction_id="t1", sender_nonce=os.urandom(16))  # fmt: skip
    with pytest.raises(ScepError) as info:
        cms.read_signed(data, AlgorithmPolicy())
    assert info.value.fail_info is FailInfo.BAD_ALG and "not accepted" in info.value.message
    # The same with a key in the policy is a signature that does not verify.
    data = client.request(MessageType.PKCS_REQ, b"csr", signer=client.self_signed(ra_key), key=other, ra=ra,
                          transaction_id="t1", sender_nonce=os.urandom(16))  # fmt: skip
    with pytest.raises(ScepError) as info:
        cms.read_signed(data, AlgorithmPolicy())
    assert info.value.fail_info is FailInfo.BAD_MESSAGE_CHECK


def test_scep_cost_keys_are_read_and_checked() -> None:
    cfg = parse_config({**MINIMAL, "scep": {
        "check_rate_per_client": 2, "check_burst_per_client": 4, "check_rate_total": 8, "check_burst_total": 16,
        "pace_max_delay_s": 0.5, "checks_in_flight": 3, "clients_max": 100, "known_client_s": 60,
    }})  # fmt: skip
    assert dataclasses.replace(cfg.scep, labels={}) == ScepSection(
        check_rate_per_client=2, check_burst_per_client=4, check_rate_total=8, check_burst_total=16,
        pace_max_delay_s=0.5, checks_in_flight=3, clients_max=100, known_client_s=60,
    )  # fmt: skip
    assert parse_config(MINIMAL).scep.check_burst_per_client == 32
    bad = {"check_rate_per_client": 0, "check_burst_per_client": 0, "check_rate_total": -1, "check_burst_total": 0,
           "pace_max_delay_s": 31, "checks_in_flight": 0, "clients_max": 1, "known_client_s": -1}  # fmt: skip
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, "scep": bad})
    assert {p.where for p in info.value.problems} == {f"scep.{k}" for k in bad}


def test_labels_parse_beside_the_cost_keys() -> None:
    cfg = parse_config(
        {**MINIMAL, "scep": {"check_rate_total": 4, "labels": {"line1": {"station": "fixture-1"}}}}
    )
    assert (
        cfg.scep.labels == {"line1": ScepLabelSection(station="fixture-1")} and cfg.scep.check_rate_total == 4
    )


async def test_units_are_given_back_when_a_request_authenticates_and_only_then(
    scep: Served,  # noqa: F811 - the fixture imported above
) -> None:
    """A challenge claimed, a renewal signed by a current certificate of this appliance, a CertPoll signed by
    the request's key: given back. A wrong challenge, a stranger's CertPoll: kept."""
    assert scep.daemon.scep is not None
    stats = scep.daemon.scep.admission.stats

    def given_back() -> int:
        return scep.daemon.scep.admission.stats["authenticated"]  # type: ignore[union-attr]

    dev = Device.new()
    first = await enrol(
        scep, dev, make_csr(dev.key, challenge=scep.challenge(device_serial="SN-0060")), tid="t60"
    )
    assert first.status is PkiStatus.SUCCESS and given_back() == 1
    refused = await enrol(scep, dev, make_csr(Device.new().key, challenge="wrong"))
    assert refused.status is PkiStatus.FAILURE and given_back() == 1
    poll = client.issuer_and_subject(scep.ra_cert.subject, dev.signer.subject)
    assert (await enrol(scep, dev, poll, tid="t60", message_type=MessageType.CERT_POLL)).certificates
    assert given_back() == 2
    stranger = await enrol(scep, Device.new(), poll, tid="t60", message_type=MessageType.CERT_POLL)
    assert stranger.status is PkiStatus.FAILURE and given_back() == 2
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    renewed = await enrol(scep, dev, make_csr(new_key), signer=first.certificates[0], key=dev.key,
                          message_type=MessageType.RENEWAL_REQ)  # fmt: skip
    assert renewed.status is PkiStatus.SUCCESS and given_back() == 3
    assert stats["admitted"] == 0  # a snapshot: taken before any request
    assert scep.daemon.scep.admission.stats["admitted"] == 5
