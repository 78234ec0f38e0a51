"""reliability.md section 2 for CMP: every bad input is one CmpError, early, in bounded time."""

from __future__ import annotations

import random

import pytest

from appliance.cmp import (
    BodyType,
    CmpError,
    FailInfo,
    Limits,
    MacProtector,
    NestedBody,
    NestedItem,
    _der,
    build_message,
    parse_message,
    verify_mac,
)
from tests.appliance.cmp.support import KID, SECRET, ir_body, ir_header
from tests.cpu import cpu_budget

MAC = MacProtector(SECRET, KID, iterations=500)


def _valid() -> bytes:
    return build_message(ir_header(), BodyType.IR, ir_body(), protection=MAC).der


def _refused(data: bytes, limits: Limits | None = None) -> CmpError:
    with cpu_budget(1.0), pytest.raises(CmpError) as err:
        parse_message(data, limits=limits or Limits())
    return err.value


def test_oversize_refused_before_parsing() -> None:
    err = _refused(b"\x30\x84" + (300_000).to_bytes(4, "big") + bytes(300_000))
    assert "exceeds the limit" in err.message and err.fail_info is FailInfo.BAD_REQUEST


def test_deep_der_nesting() -> None:
    depth = 5000
    data = b"".join(b"\x30\x84" + (6 * (depth - i - 1)).to_bytes(4, "big") for i in range(depth))
    assert "deeper" in _refused(data).message


@pytest.mark.parametrize(
    "data",
    [b"", b"\x30", b"\x30\x80\x00\x00", b"\x30\x85\x00\x00\x00\x00\x01", b"\x30\x03\x02\x01",
     b"\x1f\x81\x00\x00", b"\x02\x01\x00", b"\x30\x00", b"\x30\x84\xff\xff\xff\xff"],
)  # fmt: skip
def test_garbage_framing(data: bytes) -> None:
    assert _refused(data).fail_info is FailInfo.BAD_DATA_FORMAT


def test_trailing_bytes() -> None:
    assert "trailing" in _refused(_valid() + b"\x00").message


def test_every_truncation_and_random_mutation_is_a_cmp_error() -> None:
    valid = _valid()
    for cut in range(len(valid)):
        with pytest.raises(CmpError):
            parse_message(valid[:cut])
    rng = random.Random(5)
    for _ in range(400):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            msg = parse_message(bytes(data))
        except CmpError:
            continue
        try:
            verify_mac(msg, SECRET)
        except CmpError:
            continue


def test_same_bytes_twice_parse_identically() -> None:
    valid = _valid()
    assert parse_message(valid) == parse_message(valid)


def test_nested_with_a_bad_inner_message_keeps_the_others() -> None:
    good = [build_message(ir_header(), BodyType.IR, ir_body(), protection=MAC) for _ in range(2)]
    garbage = _der.sequence(b"\x02\x01\x05")
    body = NestedBody((NestedItem(good[0].der), NestedItem(garbage), NestedItem(good[1].der)))
    outer = parse_message(build_message(ir_header(), BodyType.NESTED, body, protection=MAC).der)
    assert isinstance(outer.body, NestedBody)
    items = outer.body.items
    assert items[1].message is None and items[1].error is not None
    assert [i.message.der for i in (items[0], items[2]) if i.message] == [g.der for g in good]


def test_nested_inside_nested_is_refused_for_that_item() -> None:
    inner = build_message(ir_header(), BodyType.IR, ir_body(), protection=MAC)
    middle = build_message(ir_header(), BodyType.NESTED, NestedBody.of(inner), protection=MAC)
    outer = parse_message(
        build_message(ir_header(), BodyType.NESTED, NestedBody.of(middle), protection=MAC).der
    )
    (item,) = outer.body.items  # type: ignore[union-attr]
    assert item.message is None and item.error is not None and "nested" in item.error.message
    assert parse_message(middle.der).body == NestedBody.of(inner)  # one level is fine


def test_batch_size_limit() -> None:
    inner = build_message(ir_header(), BodyType.IR, ir_body(), protection=MAC)
    outer = build_message(ir_header(), BodyType.NESTED, NestedBody.of(*[inner] * 5))
    assert "batch" in _refused(outer.der, Limits(max_batch_size=4)).message
    assert len(parse_message(outer.der, limits=Limits(max_batch_size=5)).body.items) == 5  # type: ignore[union-attr]


def test_too_many_requests_in_one_ir() -> None:
    body = ir_body()
    many = type(body)(body.requests * 3)
    assert (
        "CertReqMessages"
        in _refused(build_message(ir_header(), BodyType.IR, many).der, Limits(max_requests=2)).message
    )


def test_empty_nested_and_wrong_body_shapes() -> None:
    empty_nested = _der.sequence(
        build_message(
            ir_header(), BodyType.PKICONF, __import__("appliance.cmp").cmp.PkiConfBody()
        ).header_der,
        _der.context_cons(20, _der.sequence()),
    )
    _refused(empty_nested)
    wrong_shape = _der.sequence(
        build_message(ir_header(), BodyType.IR, ir_body()).header_der, _der.context_cons(0, _der.integer(3))
    )
    assert _refused(wrong_shape).fail_info is FailInfo.BAD_DATA_FORMAT
