"""A cheap repr for pyasn1 schema objects, installed on import.

pyasn1 builds some of its error messages with the repr of the schema it was decoding against ("%s not in
asn1Spec: %r", "Excessive components decoded at %r"), and a constructed schema's repr walks every type nested in
it, with their tags and constraints. For a CMP PKIBody or CertReqMessages that is thousands of nested reprs:
bench/fuzz.py's cmp target found messages of 230-560 bytes whose parse cost 0.3-0.5 s of CPU each, spent building
an error text, for a peer without credentials, before any protection check (tests/fuzz_corpus/cmp/slow-*.bin).
The appliance never shows pyasn1's texts (appliance/cmp/parse.py `_boundary` answers in its own words), so a
schema's repr is its class name; a decoded value keeps pyasn1's own repr.
"""

from __future__ import annotations

from pyasn1.type import base

_original = base.ConstructedAsn1Type.__repr__


def _schema_repr(self: object) -> str:
    if getattr(self, "isValue", False):
        return str(_original(self))
    return f"<{type(self).__name__} schema object>"


def install() -> None:
    """Idempotent: every module that decodes a peer's bytes with pyasn1 imports this module."""
    base.ConstructedAsn1Type.__repr__ = _schema_repr


install()
