"""RFC 9483 section 3.1 header rules and the ReasonCode -> failInfo table."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest

from appliance.cmp import (
    FAIL_INFO_FOR_REASON,
    NULL_DN,
    BodyType,
    CmpError,
    FailInfo,
    MacProtector,
    PkiConfBody,
    TransactionState,
    build_message,
    check_header,
    check_request,
    check_response,
    fail_info_for_error,
    follow_up_header,
    parse_message,
    response_header,
)
from appliance.cmp.model import CertConfBody, PKIHeader, PKIMessage
from appliance.errors import BirthlineError, IssuanceRefused, ReasonCode
from tests.appliance.cmp.support import KID, SECRET, dn, ir_body, ir_header

MAC = MacProtector(SECRET, KID, iterations=500)


def _msg(header: PKIHeader, body_type: BodyType = BodyType.IR, *, mac: bool = True) -> PKIMessage:
    body = (
        ir_body()
        if body_type is BodyType.IR
        else CertConfBody(())
        if body_type is BodyType.CERTCONF
        else PkiConfBody()
    )
    return parse_message(build_message(header, body_type, body, protection=MAC if mac else None).der)


def _code(call: object) -> FailInfo:
    with pytest.raises(CmpError) as err:
        call()  # type: ignore[operator]
    return err.value.fail_info


def test_first_message_and_response_headers() -> None:
    request = ir_header(implicit_confirm=True)
    assert len(request.transaction_id or b"") == 16 and len(request.sender_nonce or b"") == 16
    assert request.recip_nonce is None and request.message_time is not None
    response = response_header(request, sender=dn("CA"), implicit_confirm=True)
    assert response.transaction_id == request.transaction_id
    assert response.recip_nonce == request.sender_nonce and response.sender_nonce != request.sender_nonce
    assert response.recipient == request.sender and response.implicit_confirm
    assert not response_header(ir_header(), sender=dn("CA"), implicit_confirm=True).implicit_confirm
    check_request(_msg(request))
    check_response(_msg(response, BodyType.PKICONF), request)
    conf = follow_up_header(response, sender=request.sender)
    assert conf.transaction_id == request.transaction_id and conf.recip_nonce == response.sender_nonce
    assert conf.recipient == response.sender
    state = TransactionState(request.transaction_id or b"", response.sender_nonce or b"")
    check_request(_msg(conf, BodyType.CERTCONF), state)


def test_response_with_wrong_transaction_or_nonces() -> None:
    request = ir_header()
    good = response_header(request, sender=dn("CA"))
    assert (
        _code(
            lambda: check_response(_msg(replace(good, transaction_id=bytes(16)), BodyType.PKICONF), request)
        )
        is FailInfo.BAD_REQUEST
    )
    assert (
        _code(lambda: check_response(_msg(replace(good, recip_nonce=bytes(16)), BodyType.PKICONF), request))
        is FailInfo.BAD_RECIPIENT_NONCE
    )
    assert (
        _code(lambda: check_response(_msg(replace(good, recip_nonce=None), BodyType.PKICONF), request))
        is FailInfo.BAD_RECIPIENT_NONCE
    )
    assert (
        _code(
            lambda: check_response(
                _msg(replace(good, sender_nonce=request.sender_nonce), BodyType.PKICONF), request
            )
        )
        is FailInfo.BAD_SENDER_NONCE
    )
    assert _code(lambda: check_response(_msg(good, BodyType.IR), request)) is FailInfo.BAD_REQUEST


def test_follow_up_rules() -> None:
    request = ir_header()
    response = response_header(request, sender=dn("CA"))
    state = TransactionState(request.transaction_id or b"", response.sender_nonce or b"")
    conf = follow_up_header(response, sender=request.sender)
    assert _code(lambda: check_request(_msg(conf, BodyType.CERTCONF))) is FailInfo.BAD_REQUEST
    assert (
        _code(lambda: check_request(_msg(replace(conf, recip_nonce=bytes(16)), BodyType.CERTCONF), state))
        is FailInfo.BAD_RECIPIENT_NONCE
    )
    assert (
        _code(lambda: check_request(_msg(replace(conf, transaction_id=bytes(16)), BodyType.CERTCONF), state))
        is FailInfo.BAD_REQUEST
    )
    assert _code(lambda: check_request(_msg(request), state)) is FailInfo.BAD_REQUEST


@pytest.mark.parametrize(
    ("change", "fail_info"),
    [
        ({"pvno": 1}, FailInfo.UNSUPPORTED_VERSION),
        ({"pvno": 4}, FailInfo.UNSUPPORTED_VERSION),
        ({"transaction_id": None}, FailInfo.BAD_REQUEST),
        ({"transaction_id": b"short"}, FailInfo.BAD_REQUEST),
        ({"sender_nonce": None}, FailInfo.BAD_SENDER_NONCE),
        ({"sender_nonce": bytes(8)}, FailInfo.BAD_SENDER_NONCE),
        ({"recip_nonce": bytes(4)}, FailInfo.BAD_RECIPIENT_NONCE),
        (
            {"confirm_wait_time": dt.datetime(2030, 1, 1, tzinfo=dt.UTC), "message_time": None},
            FailInfo.MISSING_TIME_STAMP,
        ),
        ({"message_time": dt.datetime(2001, 1, 1, tzinfo=dt.UTC)}, FailInfo.BAD_TIME),
    ],
)
def test_header_rules(change: dict[str, object], fail_info: FailInfo) -> None:
    msg = _msg(replace(ir_header(), **change))  # type: ignore[arg-type]
    assert _code(lambda: check_header(msg, max_clock_skew=dt.timedelta(minutes=5))) is fail_info


def test_mac_needs_sender_kid() -> None:
    good = build_message(ir_header(), BodyType.IR, ir_body(), protection=MAC)
    without_kid = replace(good.header, sender_kid=None)
    from appliance.cmp.build import assemble, encode_header

    data = assemble(encode_header(without_kid), good.body_der, good.protection, ())
    with pytest.raises(CmpError) as err:
        check_header(parse_message(data))
    assert err.value.fail_info is FailInfo.BAD_MESSAGE_CHECK


def test_every_reason_code_has_a_fail_info() -> None:
    assert set(FAIL_INFO_FOR_REASON) == set(ReasonCode)
    assert FAIL_INFO_FOR_REASON[ReasonCode.NOT_AUTHORISED] is FailInfo.NOT_AUTHORIZED
    assert FAIL_INFO_FOR_REASON[ReasonCode.BAD_POP] is FailInfo.BAD_POP
    assert (
        fail_info_for_error(IssuanceRefused("quota", ReasonCode.QUOTA_EXHAUSTED)) is FailInfo.NOT_AUTHORIZED
    )
    assert fail_info_for_error(RuntimeError("bug")) is FailInfo.SYSTEM_FAILURE
    err = CmpError("x", fail_info=FailInfo.BAD_POP)
    assert isinstance(err, BirthlineError) and err.code is ReasonCode.BAD_POP and str(err) == "badPOP: x"
    assert [
        f.asn1_name
        for f in (FailInfo.BAD_MESSAGE_CHECK, FailInfo.TRANSACTION_ID_IN_USE, FailInfo.BAD_CERT_ID)
    ] == ["badMessageCheck", "transactionIdInUse", "badCertId"]


def test_null_dn_round_trips() -> None:
    msg = _msg(replace(ir_header(), sender=NULL_DN), BodyType.PKICONF)
    assert msg.header.sender == NULL_DN
