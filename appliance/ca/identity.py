"""The appliance's identity: the organisation whose name its CAs carry, recorded once at commissioning.

`birthline init` takes the organisation (or asks for it) and records it in the journal (`meta`, key
`organisation`), audited; it never changes afterwards. CA subjects an administrator does not give default to
`O=<organisation>, CN=<organisation> <role's name>`. The demo's organisation, "Birthline Demo", is the demo's
alone: a name carrying it is refused anywhere else, so a real line never ships certificates under the demo's
names.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from appliance.errors import BirthlineError, ReasonCode
from appliance.issuance.journal import Journal
from appliance.text import is_clean_text, safe_repr

if TYPE_CHECKING:
    from appliance.issuance.policy import AuditSink

DEMO_ORGANISATION: Final = "Birthline Demo"
ORGANISATION_MAX: Final = 64  # ub-organization-name (RFC 5280 appendix A.1)
# The common names of the CAs a role gets by default, after the organisation's name.
ROLE_NAMES: Final = {
    "root": "Device Root CA",
    "issuing": "Birth Certificate CA",
    "management": "Management CA",
}
_META_KEY: Final = "organisation"


class IdentityError(BirthlineError):
    """The organisation or a CA name was refused; the message says what to give instead."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ReasonCode.BAD_REQUEST)

    def __str__(self) -> str:
        return self.message


# Letters of other scripts that look like Latin ones (Cyrillic, Greek), lower case: "Dеmo" with a Cyrillic е
# reads as the demo's name.
_CONFUSABLES: Final = str.maketrans("аеорсухіјѕԁһӏкмтвнєαεοριυνκτμηχ", "aeopcyxijsdhlkmtbheaeopiuvktmnx")


def fold_name(text: str) -> str:
    """A name as it reads: compatibility forms and accents folded (NFKD), case folded, look-alike letters of
    other scripts mapped to Latin ones, and everything but letters and digits dropped (blanks, '-', '_', '.')."""
    import unicodedata

    decomposed = unicodedata.normalize("NFKD", text.casefold())
    letters = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).translate(_CONFUSABLES)
    return "".join(ch for ch in letters if ch.isalnum())


def is_demo_name(text: str) -> bool:
    """Whether a name carries the demo's organisation, however spelt: "Birthline-Demo", "birthline_demo",
    "BirthlineDemo" and "Birthline Dеmo" (a Cyrillic е) all do."""
    return fold_name(DEMO_ORGANISATION) in fold_name(text)


def check_organisation(value: str, *, demo: bool = False) -> str:
    """The organisation as given (blanks at either end removed), or IdentityError saying what is wrong."""
    org = value.strip()
    if not org or len(org) > ORGANISATION_MAX or not is_clean_text(org):
        raise IdentityError(f"organisation {safe_repr(value)}: 1 to {ORGANISATION_MAX} printable characters")
    if is_demo_name(org) and not demo:
        raise IdentityError(
            f"organisation {safe_repr(org)}: {DEMO_ORGANISATION!r} is the demo's name; give your organisation's"
        )
    return org


def check_subject(
    subject: x509.Name,
    *,
    demo: bool = False,
    given_by: str = "--subject, or the organisation of `birthline init`",
) -> None:
    """Refuse a CA name that carries the demo's organisation outside the demo; `given_by` names where the name
    came from, for the refusal to say what to change."""
    if demo:
        return
    for attribute in subject:
        value = attribute.value if isinstance(attribute.value, str) else ""
        if is_demo_name(value):
            raise IdentityError(
                f"CA name {subject.rfc4514_string()!r}: {DEMO_ORGANISATION!r} names are the demo's; give your"
                f" organisation's ({given_by})"
            )


def default_subject(role: str, organisation: str) -> str:
    """`O=<organisation>, CN=<organisation> <role's name>`, RFC 4514."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{organisation} {ROLE_NAMES[role]}"),
        ]
    ).rfc4514_string()


def organisation(journal: Journal) -> str | None:
    """The organisation recorded at commissioning, or None before `birthline init`."""

    def q() -> str | None:
        row = journal.conn.execute("SELECT value FROM meta WHERE key=?", (_META_KEY,)).fetchone()
        return None if row is None else str(row[0])

    return journal.call(q)


def subject_for(journal: Journal, role: str) -> str:
    """The default name of a CA of `role`: from the recorded organisation; refused before commissioning."""
    org = organisation(journal)
    if org is None:
        raise IdentityError(
            f"no organisation recorded to name the {role} CA after: run `birthline init --organisation NAME`"
            " first, or give the CA's name with --subject"
        )
    return default_subject(role, org)


def record(journal: Journal, value: str, *, audit: AuditSink, actor: str, demo: bool = False) -> str:
    """Record the organisation once; the same again is a no-op, another is refused. Returns it."""
    org = check_organisation(value, demo=demo)

    def txn(conn: sqlite3.Connection) -> str:
        row = conn.execute("SELECT value FROM meta WHERE key=?", (_META_KEY,)).fetchone()
        if row is not None:
            if row[0] != org:
                raise IdentityError(
                    f"this appliance was commissioned for {row[0]!r}; its CAs carry that name, and it does not"
                    f" change (not {org!r})"
                )
            return org
        conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (_META_KEY, org))
        audit.append(conn, actor, "appliance.identity", {"organisation": org})
        return org

    return str(journal.call(journal.transaction, txn, "recording the organisation"))
