"""Making text from the daemon inert before it reaches the screen.

Station names, device serials, refusal reasons and alarm messages come from stations, CMP peers, MES files and
other people: any of them may carry terminal escape sequences (ESC, CSI, OSC that retitles or rewrites the
terminal), C1 controls, bidi overrides that reorder what the operator reads, or Rich/Textual markup
("[bold]", "[@click=app.quit]"). The dashboard shows such text only through `inert()`, which spells every
control, format (bidi, zero-width), surrogate, private-use, unassigned and line/paragraph separator character
as a visible escape (`\\x1b`, `\\u202e`), and the widgets wrap the result in a plain rich Text (never parsed
as markup).
"""

from __future__ import annotations

import unicodedata
from typing import Final

ELLIPSIS: Final = "…"
# Unicode general categories that are never shown as themselves: C* (control, format, surrogate, private use,
# unassigned) and the line and paragraph separators, which break a table row as a newline would.
_HIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def inert(value: object, limit: int = 128) -> str:
    """`value` as text safe to show: invisible and controlling characters escaped, a backslash doubled (so an
    escape shown is never mistaken for one a peer typed), cut to `limit` characters of the original with an
    ellipsis. None is the empty string."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    out = []
    for ch in text[:limit] if cut else text:
        if ch == "\\":
            out.append("\\\\")
        elif unicodedata.category(ch) in _HIDDEN_CATEGORIES:
            out.append(_escape(ch))
        else:
            out.append(ch)
    return "".join(out) + (ELLIPSIS if cut else "")
