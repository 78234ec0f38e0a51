"""Messages found by bench/fuzz.py whose parse cost 0.3-0.5 s of CPU each: pyasn1 built its error text with the
repr of the whole schema it was decoding against (thousands of nested reprs), for a peer without credentials.
appliance/pyasn1_repr.py makes a schema's repr its class name; these tests count the nested reprs instead of
timing anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyasn1.type import namedtype
from pyasn1_alt_modules import rfc9480

from appliance.cmp import CmpError, FailInfo, parse_message

CORPUS = Path(__file__).resolve().parents[2] / "fuzz_corpus" / "cmp"
FOUND = sorted(CORPUS.glob("slow-pyasn1-repr-*.bin"))


def test_a_schema_repr_is_its_class_name() -> None:
    assert repr(rfc9480.PKIBody()) == "<PKIBody schema object>"
    assert repr(rfc9480.CertReqMessages()) == "<CertReqMessages schema object>"


@pytest.mark.parametrize("path", FOUND, ids=[p.name for p in FOUND])
def test_the_inputs_the_fuzzer_found_are_refused_without_walking_the_schema(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = namedtype.NamedTypes.__repr__

    def counting(self: namedtype.NamedTypes) -> str:
        calls.append(1)
        return str(original(self))

    monkeypatch.setattr(namedtype.NamedTypes, "__repr__", counting)
    with pytest.raises(CmpError) as refused:
        parse_message(path.read_bytes())
    assert refused.value.fail_info is FailInfo.BAD_DATA_FORMAT
    assert calls == []


def test_three_inputs_were_found() -> None:
    assert len(FOUND) == 3
